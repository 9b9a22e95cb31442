import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

// These run plain `node` (no TypeScript loader) against the built files, the way users
// meet the package: `npm test` builds first.
const root = fileURLToPath(new URL('..', import.meta.url));
const pkg = JSON.parse(readFileSync(`${root}package.json`, 'utf8')) as {
  exports: Record<string, unknown>;
  dependencies?: Record<string, string>;
  peerDependencies?: Record<string, string>;
  peerDependenciesMeta?: Record<string, { optional?: boolean }>;
};
const entries = Object.keys(pkg.exports).filter((entry) => entry !== './package.json');
const specifier = (entry: string): string => (entry === '.' ? 'bulwark' : `bulwark/${entry.slice(2)}`);

/** The packages (not Node's own modules, not the package's own files) each built JavaScript file loads at run time. */
function runtimeImports(dir: string): Map<string, string[]> {
  const found = new Map<string, string[]>();
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith('.js')) continue;
    const path = join(entry.parentPath, entry.name);
    const source = readFileSync(path, 'utf8');
    // Type-only imports are gone from the JavaScript; what is left is loaded.
    const specifiers = [...source.matchAll(/(?:^(?:import|export)\b[^;]*?\bfrom\s*|\bimport\(\s*|\brequire\(\s*)['"]([^'"]+)['"]/gm)].map((match) => match[1]!);
    const packages = specifiers.filter((specifier) => !specifier.startsWith('.') && !specifier.startsWith('node:')).map((specifier) => specifier.split('/').slice(0, specifier.startsWith('@') ? 2 : 1).join('/'));
    if (packages.length > 0) found.set(relative(dir, path), [...new Set(packages)].sort());
  }
  return found;
}

function node(args: string[]): string {
  return execFileSync(process.execPath, args, { cwd: root, encoding: 'utf8' });
}

describe('package', () => {
  it('lists every entry point of the SPEC in exports', () => {
    expect(entries.map(specifier).sort()).to.deep.equal(
      ['bulwark', 'bulwark/dashboard', 'bulwark/express', 'bulwark/fastify', 'bulwark/koa', 'bulwark/prometheus', 'bulwark/redis'].sort(),
    );
  });

  for (const entry of entries) {
    const name = specifier(entry);
    it(`${name} loads with import and with require, with type declarations`, () => {
      const imported = node(['--input-type=module', '-e', `const m = await import('${name}'); console.log(Object.keys(m).sort().join(','))`]).trim();
      const required = node(['-e', `console.log(Object.keys(require('${name}')).sort().join(','))`]).trim();
      expect(imported).to.not.equal('');
      expect(required.split(',')).to.include.members(imported.split(',').filter((key) => key !== 'default'));
      const conditions = pkg.exports[entry] as { import: { types: string }; require: { types: string } };
      expect(existsSync(`${root}${conditions.import.types}`), conditions.import.types).to.equal(true);
      expect(existsSync(`${root}${conditions.require.types}`), conditions.require.types).to.equal(true);
    });
  }

  it('loads nothing outside Node in the core; what an entry point loads, and the frameworks, are optional peer dependencies', () => {
    for (const build of ['esm', 'cjs']) {
      const imports = runtimeImports(`${root}dist/${build}`);
      for (const [file, packages] of imports) {
        if (file.startsWith('lib/')) expect.fail(`${build} ${file} loads ${packages.join(', ')}: the core has no runtime dependency`);
      }
      expect(Object.fromEntries(imports), build).to.deep.equal({ 'adapters/fastify.js': ['fastify-plugin'], 'adapters/prometheus.js': ['prom-client'] });
    }
    expect(pkg.dependencies ?? {}, 'dependencies').to.deep.equal({});
    const peers = ['express', 'koa', 'fastify', 'fastify-plugin', 'ioredis', 'prom-client'];
    expect(Object.keys(pkg.peerDependencies ?? {}).sort()).to.deep.equal([...peers].sort());
    for (const peer of peers) expect(pkg.peerDependenciesMeta?.[peer]?.optional, `${peer} optional`).to.equal(true);
  });

  it('the core exposes the same guards to import and require', () => {
    const imported = node(['--input-type=module', '-e', "const b = await import('bulwark'); console.log(typeof b.circuitBreaker, typeof b.pipeline, new b.CircuitOpenError(1000).status)"]);
    const required = node(['-e', "const b = require('bulwark'); console.log(typeof b.circuitBreaker, typeof b.pipeline, new b.CircuitOpenError(1000).status)"]);
    expect(imported.trim()).to.equal('function function 503');
    expect(required.trim()).to.equal(imported.trim());
  });
});
