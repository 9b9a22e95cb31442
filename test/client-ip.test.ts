import { expect } from 'chai';
import fc from 'fast-check';
import { canonicalIp, ipKey } from '../lib/client-ip.js';

describe('client-ip', () => {
  describe('canonicalIp', () => {
    const cases: Array<[string, string | undefined]> = [
      ['192.0.2.7', '192.0.2.7'],
      ['  192.0.2.7 ', '192.0.2.7'],
      ['192.0.2.7:54321', '192.0.2.7'],
      ['::ffff:192.0.2.7', '192.0.2.7'],
      ['::FFFF:192.0.2.7', '192.0.2.7'],
      ['::ffff:c000:0207', '192.0.2.7'],
      ['0:0:0:0:0:ffff:192.0.2.7', '192.0.2.7'],
      ['2001:DB8::1', '2001:db8::1'],
      ['2001:0db8:0000:0000:0000:0000:0000:0001', '2001:db8::1'],
      ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
      ['2001:db8::1:0:0:1', '2001:db8::1:0:0:1'],
      ['fe80::1%eth0', 'fe80::1'],
      ['[2001:db8::1]', '2001:db8::1'],
      ['[2001:db8::1%25en0]:443', '2001:db8::1'],
      ['::', '::'],
      ['::1', '::1'],
      ['1::', '1::'],
      ['1:2:3:4:5:6:7:8', '1:2:3:4:5:6:7:8'],
      ['1:2:3:4:5:6:1.2.3.4', '1:2:3:4:5:6:102:304'],
      // not addresses
      ['', undefined],
      ['unknown', undefined],
      ['1.2.3', undefined],
      ['1.2.3.4.5', undefined],
      ['256.1.1.1', undefined],
      ['01.2.3.4', undefined],
      ['1:2:3:4:5:6:7:8:9', undefined],
      ['1::2::3', undefined],
      [':1', undefined],
      ['1:', undefined],
      [':::', undefined],
      ['12345::', undefined],
      ['1.2.3.4::', undefined],
      ['1:2:3:4:5:6:7:1.2.3.4', undefined],
      ['[::1', undefined],
      ['[::1]x', undefined],
      ['g::1', undefined],
    ];
    for (const [input, expected] of cases) {
      it(`${JSON.stringify(input)} → ${String(expected)}`, () => {
        expect(canonicalIp(input)).to.equal(expected);
      });
    }

    it('agrees with the WHATWG URL serializer for any IPv6 address in any spelling', () => {
      const word = fc.integer({ min: 0, max: 0xffff });
      // Bias towards zeros so that `::` compression is exercised.
      const biased = fc.oneof(word, fc.constant(0), fc.constant(0));
      fc.assert(
        fc.property(fc.array(biased, { minLength: 8, maxLength: 8 }), fc.boolean(), fc.boolean(), (words, upper, padded) => {
          if (words.slice(0, 5).every((w) => w === 0) && words[5] === 0xffff) return; // mapped: tested apart
          const full = words.map((w) => w.toString(16).padStart(padded ? 4 : 1, '0')).join(':');
          const text = upper ? full.toUpperCase() : full;
          const reference = new URL(`http://[${full}]/`).hostname.slice(1, -1);
          expect(canonicalIp(text)).to.equal(reference);
          // And the canonical form is a fixed point.
          expect(canonicalIp(reference)).to.equal(reference);
        }),
      );
    });
  });

  describe('ipKey', () => {
    it('keys IPv4 by the address itself', () => {
      expect(ipKey('203.0.113.9')).to.equal('203.0.113.9');
    });

    it('maps IPv4-mapped IPv6 to the IPv4 address (one budget for both forms)', () => {
      expect(ipKey('::ffff:203.0.113.9')).to.equal('203.0.113.9');
      expect(ipKey('::ffff:cb00:7109')).to.equal('203.0.113.9');
      // …and not all mapped addresses into one bucket.
      expect(ipKey('::ffff:203.0.113.10')).to.equal('203.0.113.10');
    });

    it('keys IPv6 by its /64, whatever the spelling', () => {
      const spellings = [
        '2001:db8:aaaa:bbbb:1:2:3:4',
        '2001:DB8:AAAA:BBBB:ffff:ffff:ffff:ffff',
        '2001:0db8:aaaa:bbbb:0000:0000:0000:0001',
        '2001:db8:aaaa:bbbb::1',
        '[2001:db8:aaaa:bbbb::9]:8443',
        '2001:db8:aaaa:bbbb::1%eth0',
      ];
      for (const spelling of spellings) expect(ipKey(spelling), spelling).to.equal('2001:db8:aaaa:bbbb::/64');
      expect(ipKey('2001:db8:aaaa:bbbc::1')).to.equal('2001:db8:aaaa:bbbc::/64');
      expect(ipKey('2001:db8::1')).to.equal('2001:db8::/64');
    });

    it('takes another prefix length', () => {
      expect(ipKey('2001:db8:aaaa:bbbb::1', 48)).to.equal('2001:db8:aaaa::/48');
      expect(ipKey('2001:db8:aaaa:bbff::1', 56)).to.equal('2001:db8:aaaa:bb00::/56');
      expect(ipKey('2001:db8:aaaa:bbbb::1', 128)).to.equal('2001:db8:aaaa:bbbb::1');
      expect(() => ipKey('::1', 0)).to.throw(TypeError, 'ipKey: ipv6PrefixLength must be an integer from 1 to 128, got 0');
      expect(() => ipKey('::1', 64.5)).to.throw(TypeError, 'got 64.5');
    });

    it('any two addresses of one /64 share a key; addresses of different /64s do not', () => {
      const word = fc.integer({ min: 0, max: 0xffff });
      const prefix = fc.array(word, { minLength: 4, maxLength: 4 }).filter((p) => p.some((w) => w !== 0));
      const host = fc.array(word, { minLength: 4, maxLength: 4 });
      fc.assert(
        fc.property(prefix, prefix, host, host, (p1, p2, h1, h2) => {
          const address = (p: number[], h: number[]) => [...p, ...h].map((w) => w.toString(16)).join(':');
          expect(ipKey(address(p1, h1))).to.equal(ipKey(address(p1, h2)));
          const same = p1.every((w, i) => w === p2[i]);
          expect(ipKey(address(p1, h1)) === ipKey(address(p2, h2))).to.equal(same);
        }),
      );
    });

    it('keeps text that is not an address, trimmed and lower-cased', () => {
      expect(ipKey(' Unknown ')).to.equal('unknown');
      expect(ipKey('1.2.3.04')).to.equal('1.2.3.04');
    });
  });
});
