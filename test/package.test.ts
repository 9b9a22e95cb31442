import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

// These run plain `node` (no TypeScript loader) against the built files, the way users
// meet the package: `npm test` builds first.
const root = fileURLToPath(new URL('..', import.meta.url));
const pkg = JSON.parse(readFileSync(`${root}package.json`, 'utf8')) as { exports: Record<string, unknown> };
const entries = Object.keys(pkg.exports).filter((entry) => entry !== './package.json');
const specifier = (entry: string): string => (entry === '.' ? 'bulwark' : `bulwark/${entry.slice(2)}`);

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

  it('the core exposes the same guards to import and require', () => {
    const imported = node(['--input-type=module', '-e', "const b = await import('bulwark'); console.log(typeof b.circuitBreaker, typeof b.pipeline, new b.CircuitOpenError(1000).status)"]);
    const required = node(['-e', "const b = require('bulwark'); console.log(typeof b.circuitBreaker, typeof b.pipeline, new b.CircuitOpenError(1000).status)"]);
    expect(imported.trim()).to.equal('function function 503');
    expect(required.trim()).to.equal(imported.trim());
  });
});
