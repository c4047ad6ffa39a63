// End-to-end encryption of a room's messages with WebCrypto: AES-GCM with a 256-bit key per
// room. The key is derived from the room's secret (PBKDF2-SHA-256, the room's name as salt),
// which its members share out of band; the relays and the hub carry only ciphertext.
//
// A sealed message is JSON: {"v":1,"iv":base64,"ct":base64}. The topic it is published to is
// the additional authenticated data: a ciphertext moved to another room or given another
// sender's topic does not open.

const text = new TextEncoder();
const words = new TextDecoder();

const toBase64 = (bytes) => btoa(String.fromCharCode(...bytes));
const fromBase64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

/** The AES-GCM key of `room` for the shared `secret`. */
export async function roomKey(room, secret) {
  const base = await crypto.subtle.importKey('raw', text.encode(secret), 'PBKDF2', false, ['deriveKey']);
  return crypto.subtle.deriveKey(
    { name: 'PBKDF2', salt: text.encode(`office-chat room ${room}`), iterations: 210000, hash: 'SHA-256' },
    base,
    { name: 'AES-GCM', length: 256 },
    false,
    ['encrypt', 'decrypt'],
  );
}

/** Encrypts `value` (any JSON) for `topic`; returns the text to publish. */
export async function seal(key, topic, value) {
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const ct = await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv, additionalData: text.encode(topic) },
    key,
    text.encode(JSON.stringify(value)),
  );
  return JSON.stringify({ v: 1, iv: toBase64(iv), ct: toBase64(new Uint8Array(ct)) });
}

/** Decrypts what `seal` made for `topic`; throws when it was not made with this key for it. */
export async function open(key, topic, sealed) {
  const { v, iv, ct } = JSON.parse(sealed);
  if (v !== 1) throw new Error(`unknown message version ${v}`);
  const plain = await crypto.subtle.decrypt(
    { name: 'AES-GCM', iv: fromBase64(iv), additionalData: text.encode(topic) },
    key,
    fromBase64(ct),
  );
  return JSON.parse(words.decode(plain));
}
