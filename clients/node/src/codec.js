/**
 * Payload codecs: AES-256-GCM envelopes (docs/encryption.md), so the broker only ever holds
 * ciphertext. The same format as the Python SDK's `taskbroker.encryption`:
 *
 *   magic 0x89 'TBE' | version 1 | flags (bit 0: zlib) | key id length | key id | nonce (12)
 *   | ciphertext | tag (16)
 *
 * with associated data = header | purpose (1 payload, 2 result) | len16+queue | len16+type
 * | len16+task id (results only).
 *
 * @module
 */

import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { deflateSync, inflateSync } from 'node:zlib';

export const MAGIC = Buffer.from([0x89, 0x54, 0x42, 0x45]);
export const VERSION = 1;
export const FLAG_ZLIB = 0x01;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;
const KEY_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const MIN_ENVELOPE_BYTES = MAGIC.length + 3 + 1 + NONCE_BYTES + TAG_BYTES;
const PURPOSES = { payload: 1, result: 2 };
/** Decompressed plaintexts larger than this are refused. */
export const DEFAULT_MAX_PLAINTEXT_BYTES = 64 * 1024 * 1024;

/**
 * Where a value belongs; bound into the ciphertext as associated data.
 *
 * @typedef {object} CodecContext
 * @property {'payload' | 'result'} purpose set by the producer, or by the worker's ack
 * @property {string} queue the task's queue
 * @property {string} type the task's type
 * @property {string} [taskId] the task's id, for results only
 * @property {string} [idempotencyKey] a payload's idempotency key (not in the associated data):
 *   with one, the nonce is derived, so a resend encrypts to the same bytes
 */

/**
 * Anything that turns payloads and results into what the broker stores, and back.
 *
 * @typedef {object} PayloadCodec
 * @property {(data: Buffer, context: CodecContext) => Buffer} encode
 * @property {(data: Buffer, context: CodecContext) => Buffer} decode throws a `CodecError`
 */

/** Keys the HMAC that derives nonces (the AES key itself never keys HMAC). */
const NONCE_KEY_LABEL = Buffer.from('taskbroker envelope v1 nonce key');

/**
 * The nonce of a value with an idempotency key (docs/encryption.md, "Derived nonces"), as the
 * Python SDK derives it.
 *
 * @param {Buffer} key the AES key
 * @param {Buffer} ad the value's associated data
 * @param {string} idempotencyKey the task's idempotency key
 * @param {Buffer} plaintext the (maybe compressed) plaintext
 * @returns {Buffer} 12 bytes
 */
export function derivedNonce(key, ad, idempotencyKey, plaintext) {
  const nonceKey = createHmac('sha256', key).update(NONCE_KEY_LABEL).digest();
  const idem = Buffer.from(idempotencyKey, 'utf8');
  const length = Buffer.alloc(2);
  length.writeUInt16BE(idem.length);
  const mac = createHmac('sha256', nonceKey).update(ad).update(length).update(idem);
  return mac.update(plaintext).digest().subarray(0, NONCE_BYTES);
}

/** A payload or result could not be encoded or decoded; never holds plaintext or keys. */
export class CodecError extends Error {
  name = 'CodecError';

  /**
   * @param {string} message what went wrong, naming the key id where known
   * @param {string} [keyId] the envelope's key id
   */
  constructor(message, keyId = '') {
    super(message);
    this.keyId = keyId;
  }
}

/**
 * @param {string} keyId a key id
 * @returns {string} it, if it is 1-64 characters of [A-Za-z0-9_.-]
 */
function checkKeyId(keyId) {
  if (!KEY_ID.test(keyId)) {
    const shown = JSON.stringify(keyId);
    throw new RangeError(`key id ${shown}: use 1-64 characters of [A-Za-z0-9_.-]`);
  }
  return keyId;
}

/**
 * @param {CodecContext} context where the value belongs
 * @returns {string} a description for error messages (no payload bytes)
 */
function describe({ purpose, queue, type, taskId }) {
  const where = `queue '${queue}', type '${type}'`;
  return taskId ? `the ${purpose} of task ${taskId} (${where})` : `a ${purpose} (${where})`;
}

/**
 * The GCM associated data of a value.
 *
 * @param {Buffer} header the envelope's header (magic to key id)
 * @param {CodecContext} context where the value belongs
 * @returns {Buffer} header | purpose | length-prefixed queue, type and task id
 */
export function associatedData(header, context) {
  const parts = [header, Buffer.from([PURPOSES[context.purpose]])];
  for (const text of [context.queue, context.type, context.taskId ?? '']) {
    const encoded = Buffer.from(text, 'utf8');
    const length = Buffer.alloc(2);
    length.writeUInt16BE(encoded.length);
    parts.push(length, encoded);
  }
  return Buffer.concat(parts);
}

/**
 * Reads an envelope's clear header: enough to show "encrypted, key k2, N bytes" without a key.
 *
 * @param {Buffer} data an envelope
 * @returns {{version: number, flags: number, keyId: string, size: number, header: Buffer}}
 *   the header's fields; throws a `CodecError` for anything that is not a version-1 envelope
 */
export function parseHeader(data) {
  if (!isEnvelope(data)) throw new CodecError('not an encrypted envelope');
  if (data.length < MIN_ENVELOPE_BYTES) {
    throw new CodecError(`envelope truncated (${data.length} bytes)`);
  }
  const [version, flags, keyLength] = [data[4], data[5], data[6]];
  if (version !== VERSION) {
    throw new CodecError(`envelope version ${version} is not supported (1 is)`);
  }
  if (flags & ~FLAG_ZLIB) {
    throw new CodecError(`envelope flags 0x${flags.toString(16)} are not supported`);
  }
  const end = 7 + keyLength;
  if (keyLength < 1 || keyLength > 64 || data.length < end + NONCE_BYTES + TAG_BYTES) {
    throw new CodecError('envelope key id length is out of range');
  }
  const keyId = data.subarray(7, end).toString('latin1');
  if (!KEY_ID.test(keyId)) throw new CodecError('envelope key id is not [A-Za-z0-9_.-]');
  return { version, flags, keyId, size: data.length, header: data.subarray(0, end) };
}

/**
 * @param {Buffer} data any bytes
 * @returns {boolean} whether they start with the envelope magic
 */
export function isEnvelope(data) {
  return data.length >= MAGIC.length && data.subarray(0, MAGIC.length).equals(MAGIC);
}

/** Encryption keys by id, and which one encrypts new values. */
export class Keyring {
  /**
   * @param {Record<string, Buffer>} keys key id → 32-byte key
   * @param {string} [active] the id of the key that encrypts new values (default: the last)
   */
  constructor(keys, active) {
    const ids = Object.keys(keys);
    if (ids.length === 0) throw new RangeError('keyring: give at least one key');
    for (const id of ids) {
      checkKeyId(id);
      if (keys[id].length !== KEY_BYTES) {
        throw new RangeError(`keyring: key '${id}' must be 32 bytes, not ${keys[id].length}`);
      }
    }
    /** @type {Map<string, Buffer>} */
    this.keys = new Map(ids.map((id) => [id, Buffer.from(keys[id])]));
    this.active = active ?? ids[ids.length - 1];
    if (!this.keys.has(this.active)) {
      throw new RangeError(`keyring: the active key '${this.active}' is not in the ring`);
    }
  }

  /** @returns {string[]} the ids held, in the order given */
  get keyIds() {
    return [...this.keys.keys()];
  }

  /**
   * Reads "<id>=<base64 of 32 bytes>" entries separated by commas or new lines (# comments).
   *
   * @param {string} text the keyring text
   * @param {string} [active] the active key id (default: the last)
   * @returns {Keyring} the keyring
   */
  static parse(text, active) {
    /** @type {Record<string, Buffer>} */
    const keys = {};
    for (const raw of text.replaceAll(',', '\n').split('\n')) {
      const entry = raw.trim();
      if (!entry || entry.startsWith('#')) continue;
      const at = entry.indexOf('=');
      const id = checkKeyId((at < 0 ? entry : entry.slice(0, at)).trim());
      if (at < 0) throw new RangeError(`keyring: entry '${id}' has no '=<base64 key>'`);
      const encoded = entry.slice(at + 1).trim();
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(encoded) || encoded.length % 4 !== 0) {
        throw new RangeError(`keyring: key '${id}' is not valid base64`);
      }
      keys[id] = Buffer.from(encoded, 'base64');
    }
    return new Keyring(keys, active);
  }

  /**
   * Reads TASKBROKER_ENCRYPTION_KEYS (or the file TASKBROKER_ENCRYPTION_KEYS_FILE names) and
   * TASKBROKER_ENCRYPTION_ACTIVE_KEY, as the Python SDK does.
   *
   * @param {NodeJS.ProcessEnv} [env] default: `process.env`
   * @returns {Keyring} the keyring
   */
  static fromEnv(env = process.env) {
    const active = env.TASKBROKER_ENCRYPTION_ACTIVE_KEY || undefined;
    const { TASKBROKER_ENCRYPTION_KEYS: text, TASKBROKER_ENCRYPTION_KEYS_FILE: file } = env;
    if (text) return Keyring.parse(text, active);
    if (file) return Keyring.parse(readFileSync(file, 'ascii'), active);
    throw new RangeError(
      'keyring: set TASKBROKER_ENCRYPTION_KEYS or TASKBROKER_ENCRYPTION_KEYS_FILE',
    );
  }

  /** @returns {string} ids only: keys must never reach a log */
  toString() {
    return `Keyring(${this.keyIds.join(', ')}; active ${this.active})`;
  }
}

/**
 * AES-256-GCM envelopes with a random 96-bit nonce per value (derived from the value for a
 * payload with an idempotency key, so a resend is byte-identical): a `PayloadCodec`.
 */
export class AesGcmCodec {
  /**
   * @param {Keyring} keyring the keys; new values use its active key
   * @param {object} [options]
   * @param {number | null} [options.compressMinBytes] compress plaintexts of at least this many
   *   bytes with zlib when that makes them smaller; null (default): never
   * @param {boolean} [options.allowPlaintext] pass bytes that are not an envelope through
   *   (default false: refuse them)
   * @param {number} [options.maxPlaintextBytes] refuse to decompress past this size
   */
  constructor(
    keyring,
    {
      compressMinBytes = null,
      allowPlaintext = false,
      maxPlaintextBytes = DEFAULT_MAX_PLAINTEXT_BYTES,
    } = {},
  ) {
    this.keyring = keyring;
    this.compressMinBytes = compressMinBytes;
    this.allowPlaintext = allowPlaintext;
    this.maxPlaintextBytes = maxPlaintextBytes;
  }

  /**
   * Encrypts a payload or result with the active key.
   *
   * @param {Buffer} data the plaintext
   * @param {CodecContext} context where it belongs
   * @returns {Buffer} the envelope
   */
  encode(data, context) {
    let plaintext = Buffer.from(data);
    let flags = 0;
    if (this.compressMinBytes !== null && plaintext.length >= this.compressMinBytes) {
      const compressed = deflateSync(plaintext);
      if (compressed.length < plaintext.length) [plaintext, flags] = [compressed, FLAG_ZLIB];
    }
    const keyId = this.keyring.active;
    const id = Buffer.from(keyId, 'ascii');
    const header = Buffer.concat([MAGIC, Buffer.from([VERSION, flags, id.length]), id]);
    const key = /** @type {Buffer} */ (this.keyring.keys.get(keyId)); // the keyring checked it
    const ad = associatedData(header, context);
    const nonce = context.idempotencyKey
      ? derivedNonce(key, ad, context.idempotencyKey, plaintext)
      : randomBytes(NONCE_BYTES);
    const cipher = createCipheriv('aes-256-gcm', key, nonce);
    cipher.setAAD(ad);
    const sealed = Buffer.concat([cipher.update(plaintext), cipher.final()]);
    return Buffer.concat([header, nonce, sealed, cipher.getAuthTag()]);
  }

  /**
   * Decrypts an envelope (or passes plaintext through, if allowed).
   *
   * @param {Buffer} data the stored bytes
   * @param {CodecContext} context where they belong
   * @returns {Buffer} the plaintext; throws a `CodecError` naming the key id when the key is
   *   unknown or the tag does not verify
   */
  decode(data, context) {
    const bytes = Buffer.from(data);
    if (!isEnvelope(bytes)) {
      if (this.allowPlaintext) return bytes;
      throw new CodecError(
        `${describe(context)} is not encrypted (${bytes.length} bytes without the envelope ` +
          'prefix) and this codec refuses plaintext (allowPlaintext: false)',
      );
    }
    const { flags, keyId, header } = parseHeader(bytes);
    const key = this.keyring.keys.get(keyId);
    if (!key) {
      throw new CodecError(
        `${describe(context)} is encrypted with key '${keyId}', which this keyring does not ` +
          `hold (it holds ${this.keyring.keyIds.join(', ')})`,
        keyId,
      );
    }
    const start = header.length;
    const nonce = bytes.subarray(start, start + NONCE_BYTES);
    const tag = bytes.subarray(bytes.length - TAG_BYTES);
    let plaintext;
    try {
      const decipher = createDecipheriv('aes-256-gcm', key, nonce);
      decipher.setAAD(associatedData(header, context));
      decipher.setAuthTag(tag);
      const body = bytes.subarray(start + NONCE_BYTES, bytes.length - TAG_BYTES);
      plaintext = Buffer.concat([decipher.update(body), decipher.final()]);
    } catch {
      throw new CodecError(
        `${describe(context)} does not decrypt with key '${keyId}': the key differs from the ` +
          'encrypting one, or the bytes were altered or moved from another queue, type or task',
        keyId,
      );
    }
    if (!(flags & FLAG_ZLIB)) return plaintext;
    try {
      return inflateSync(plaintext, { maxOutputLength: this.maxPlaintextBytes });
    } catch {
      throw new CodecError(
        `${describe(context)} (key '${keyId}') does not decompress within ` +
          `${this.maxPlaintextBytes} bytes`,
        keyId,
      );
    }
  }

  /** @returns {string} ids only */
  toString() {
    return `AesGcmCodec(${this.keyring})`;
  }
}

/**
 * @param {string} queue the task's queue
 * @param {string} type the task's type
 * @param {string} [idempotencyKey] the task's idempotency key, when encoding
 * @returns {CodecContext} a payload's context
 */
export function payloadContext(queue, type, idempotencyKey = '') {
  return { purpose: 'payload', queue, type, idempotencyKey };
}

/**
 * @param {string} queue the task's queue
 * @param {string} type the task's type
 * @param {string} taskId the task's id
 * @returns {CodecContext} a result's context
 */
export function resultContext(queue, type, taskId) {
  return { purpose: 'result', queue, type, taskId };
}

/**
 * Decodes a `Task` message read through GetTask: its payload, and a succeeded task's result.
 *
 * @param {PayloadCodec | undefined} codec the codec, if any
 * @param {any} task the `Task` message (changed in place)
 * @returns {any} the task
 */
export function decodeTask(codec, task) {
  if (!codec) return task;
  task.payload = codec.decode(task.payload, payloadContext(task.queue, task.type));
  if (task.state === 'TASK_STATE_SUCCEEDED') {
    task.result = codec.decode(task.result, resultContext(task.queue, task.type, task.id));
  }
  return task;
}

/**
 * A delivery's payload, decoded for the handler.
 *
 * @param {PayloadCodec | undefined} codec the worker's codec, if any
 * @param {any} task the delivered `Task` message
 * @returns {Buffer} the plaintext; throws a `CodecError` ("payload not decoded: ...") when it
 *   cannot be decoded
 */
export function openPayload(codec, task) {
  if (!codec) return task.payload;
  try {
    return codec.decode(task.payload, payloadContext(task.queue, task.type));
  } catch (error) {
    if (!(error instanceof CodecError)) throw error;
    throw new CodecError(`payload not decoded: ${error.message}`, error.keyId);
  }
}

/**
 * A handler's result, encoded for the ack (bound to the task's id).
 *
 * @param {PayloadCodec | undefined} codec the worker's codec, if any
 * @param {any} task the delivered `Task` message
 * @param {Buffer} result the handler's result
 * @returns {Buffer} what the ack carries
 */
export function sealResult(codec, task, result) {
  return codec ? codec.encode(result, resultContext(task.queue, task.type, task.id)) : result;
}
