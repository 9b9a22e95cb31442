// Client addresses as rate-limit keys. A key must be the same for every address one client
// can use, and different for different clients:
// - an IPv4 client that reaches a dual-stack socket shows up as `::ffff:1.2.3.4`, and must
//   share its budget with `1.2.3.4`;
// - an IPv6 client usually owns a whole /64 (and often a /56 or /48), so keying by the full
//   address lets it rotate through 2^64 addresses and never be limited;
// - the same IPv6 address has many spellings (`2001:DB8::1`, `2001:db8:0:0::1`, with a zone
//   id `%eth0`, in brackets with a port): they must give one key.

/**
 * The canonical text of an IP address: IPv4 in dotted decimal, IPv4-mapped IPv6
 * (`::ffff:1.2.3.4`) as the IPv4 address, other IPv6 in RFC 5952 form (lower case, zeros
 * compressed), without zone id, brackets or port. `undefined` when `address` is not an IP.
 *
 * @example
 * canonicalIp('::FFFF:10.0.0.1');          // '10.0.0.1'
 * canonicalIp('[2001:DB8:0:0::1%eth0]:443'); // '2001:db8::1'
 */
export function canonicalIp(address: string): string | undefined {
  const text = stripDecorations(address);
  if (text === undefined) return undefined;
  if (!text.includes(':')) return isCanonicalIPv4(text) ? text : undefined;
  const words = parseIPv6(text);
  if (words === undefined) return undefined;
  if (isIPv4Mapped(words)) return mappedIPv4(words);
  return formatIPv6(words);
}

/**
 * The rate-limit key of a client address: an IPv4 address as itself, an IPv4-mapped IPv6
 * address as its IPv4 address, any other IPv6 address as its network prefix
 * (`/64` unless `ipv6PrefixLength` says otherwise, e.g. 56 for home connections that are
 * handed a /56). Text that is not an IP address is returned trimmed and lower-cased, so it
 * still keys consistently. Use it in your own `key` functions.
 *
 * @example
 * ipKey('2001:db8:1:2:3:4:5:6');      // '2001:db8:1:2::/64'
 * ipKey('2001:db8:1:2:3:4:5:6', 48);  // '2001:db8:1::/48'
 * ipKey('::ffff:192.0.2.7');          // '192.0.2.7'
 * rateLimit({ limit: 100, windowMs: 60_000, key: (request) => `${ipKey(request?.ip ?? '')}:${request?.path}` });
 */
export function ipKey(address: string, ipv6PrefixLength = 64): string {
  if (!Number.isInteger(ipv6PrefixLength) || ipv6PrefixLength < 1 || ipv6PrefixLength > 128) {
    throw new TypeError(`ipKey: ipv6PrefixLength must be an integer from 1 to 128, got ${String(ipv6PrefixLength)}`);
  }
  // Fast path for the common case: a plain, canonical IPv4 address is its own key.
  if (isCanonicalIPv4(address)) return address;
  const text = stripDecorations(address);
  if (text === undefined) return address.trim().toLowerCase();
  if (!text.includes(':')) return isCanonicalIPv4(text) ? text : text.toLowerCase();
  const words = parseIPv6(text);
  if (words === undefined) return text.toLowerCase();
  if (isIPv4Mapped(words)) return mappedIPv4(words);
  if (ipv6PrefixLength === 128) return formatIPv6(words);
  for (let i = 0; i < 8; i++) {
    const keep = Math.min(16, Math.max(0, ipv6PrefixLength - 16 * i));
    words[i] = keep === 0 ? 0 : words[i]! & (0xffff << (16 - keep)) & 0xffff;
  }
  return `${formatIPv6(words)}/${ipv6PrefixLength}`;
}

/** Trims, and removes `[…]`, a `:port`, and an IPv6 zone id (`%eth0`). */
function stripDecorations(address: string): string | undefined {
  let text = address.trim();
  if (text.length === 0) return undefined;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0) return undefined;
    const rest = text.slice(close + 1);
    if (rest !== '' && !/^:\d{1,5}$/.test(rest)) return undefined;
    text = text.slice(1, close);
  } else {
    // `1.2.3.4:5678` (Azure and some proxies append the client port to X-Forwarded-For).
    const colon = text.indexOf(':');
    if (colon > 0 && colon === text.lastIndexOf(':') && text.includes('.') && /^\d{1,5}$/.test(text.slice(colon + 1))) {
      text = text.slice(0, colon);
    }
  }
  const zone = text.indexOf('%');
  if (zone >= 0) text = text.slice(0, zone);
  return text.length === 0 ? undefined : text;
}

/** Four decimal octets 0..255 without leading zeros (which some parsers read as octal). */
function isCanonicalIPv4(text: string): boolean {
  return text.length >= 7 && text.length <= 15 && ipv4Value(text, 0) >= 0;
}

/** The 32-bit value of the canonical IPv4 address that fills `text` from `start`, or -1. */
function ipv4Value(text: string, start: number): number {
  const length = text.length;
  let address = 0;
  let octets = 0;
  let value = 0;
  let digits = 0;
  for (let i = start; i <= length; i++) {
    const code = i === length ? 46 : text.charCodeAt(i);
    if (code === 46 /* . */) {
      if (digits === 0 || value > 255 || octets === 4) return -1;
      address = address * 256 + value;
      octets++;
      value = 0;
      digits = 0;
    } else if (code >= 48 && code <= 57) {
      if (digits === 1 && value === 0) return -1;
      value = value * 10 + (code - 48);
      digits++;
      if (digits > 3) return -1;
    } else {
      return -1;
    }
  }
  return octets === 4 ? address : -1;
}

/**
 * The eight 16-bit words of an IPv6 address, or undefined when the text is not one. One
 * pass over the character codes: this runs per request for IPv6 clients.
 */
function parseIPv6(text: string): number[] | undefined {
  const length = text.length;
  const words: number[] = [0, 0, 0, 0, 0, 0, 0, 0];
  let count = 0;
  let gapAt = -1;
  let i = 0;
  if (text.charCodeAt(0) === 58 /* : */) {
    if (text.charCodeAt(1) !== 58) return undefined;
    gapAt = 0;
    i = 2;
  }
  while (i < length) {
    const groupStart = i;
    let value = 0;
    let digits = 0;
    for (; i < length && digits <= 4; i++) {
      const digit = hexDigit(text.charCodeAt(i));
      if (digit < 0) break;
      value = value * 16 + digit;
      digits++;
    }
    if (i < length && text.charCodeAt(i) === 46 /* . */) {
      // A dotted IPv4 address may only end the address, and takes two words.
      const v4 = count > 6 ? -1 : ipv4Value(text, groupStart);
      if (v4 < 0) return undefined;
      words[count++] = Math.floor(v4 / 65536);
      words[count++] = v4 % 65536;
      i = length;
      break;
    }
    if (digits === 0 || digits > 4 || count === 8) return undefined;
    words[count++] = value;
    if (i === length) break;
    if (text.charCodeAt(i) !== 58) return undefined;
    i++;
    if (text.charCodeAt(i) === 58) {
      if (gapAt >= 0) return undefined;
      gapAt = count;
      i++;
    } else if (i === length) {
      return undefined;
    }
  }
  if (gapAt < 0) return count === 8 ? words : undefined;
  if (count > 7) return undefined;
  // Move the words after `::` to the end, zeros in between.
  const tail = count - gapAt;
  for (let k = 1; k <= tail; k++) {
    words[8 - k] = words[count - k]!;
    words[count - k] = 0;
  }
  for (let k = gapAt; k < 8 - tail; k++) words[k] = 0;
  return words;
}

function hexDigit(code: number): number {
  if (code >= 48 && code <= 57) return code - 48;
  if (code >= 97 && code <= 102) return code - 87;
  if (code >= 65 && code <= 70) return code - 55;
  return -1;
}

function isIPv4Mapped(words: number[]): boolean {
  return words[0] === 0 && words[1] === 0 && words[2] === 0 && words[3] === 0 && words[4] === 0 && words[5] === 0xffff;
}

function mappedIPv4(words: number[]): string {
  const high = words[6]!;
  const low = words[7]!;
  return `${high >>> 8}.${high & 0xff}.${low >>> 8}.${low & 0xff}`;
}

/** RFC 5952: lower-case hex, no leading zeros, the longest run (>= 2) of zero words as `::`. */
function formatIPv6(words: number[]): string {
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (words[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && words[j] === 0) j++;
    if (j - i > bestLength) {
      bestStart = i;
      bestLength = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return hex(words, 0, 8);
  return `${hex(words, 0, bestStart)}::${hex(words, bestStart + bestLength, 8)}`;
}

function hex(words: number[], from: number, to: number): string {
  let text = '';
  for (let i = from; i < to; i++) text += i === from ? words[i]!.toString(16) : `:${words[i]!.toString(16)}`;
  return text;
}
