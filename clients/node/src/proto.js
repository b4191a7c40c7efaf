/**
 * Loads the taskbroker API from the repository's `proto/` directory at runtime, so this client
 * has no copy of the protocol of its own: a change to a `.proto` file is picked up on the next
 * start. Lease stream frames are decoded with protobuf's merge rule (see `mergingDecoder`).
 * Also converts between milliseconds and `google.protobuf.Duration` / `Timestamp`.
 *
 * @module
 */

import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** The repository's `proto/` directory (this file is `clients/node/src/proto.js`). */
export const PROTO_DIR = fileURLToPath(new URL('../../../proto', import.meta.url));

/**
 * How messages look in JavaScript: field names as in the `.proto` files (`task_id`), enums as
 * their names (`'TASK_STATE_SUCCEEDED'`), 64-bit integers as numbers, bytes as Buffers, unset
 * scalar fields as their defaults, and a `frame` property naming the member set in a `oneof`.
 */
const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

/** @type {any} */
let cached;

/**
 * The `taskbroker.v1` package: service client constructors (`BrokerService`, `AdminService`).
 *
 * @returns {any} the loaded package (grpc-js builds it dynamically, hence untyped)
 */
export function taskbrokerV1() {
  if (!cached) {
    const definition = protoLoader.loadSync(
      ['taskbroker/v1/broker_service.proto', 'taskbroker/v1/admin_service.proto'],
      LOADER_OPTIONS,
    );
    const lease = /** @type {any} */ (definition['taskbroker.v1.BrokerService']).Lease;
    lease.responseDeserialize = mergingDecoder(lease.responseDeserialize);
    cached = /** @type {any} */ (grpc.loadPackageDefinition(definition)).taskbroker.v1;
  }
  return cached;
}

/**
 * A `google.protobuf.Duration` of `ms` milliseconds.
 *
 * @param {number} ms a non-negative number of milliseconds
 * @returns {{seconds: number, nanos: number}} the duration message
 */
export function toDuration(ms) {
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

/**
 * Milliseconds in a `google.protobuf.Duration` or `Timestamp` (since the epoch), or null when
 * the field is unset.
 *
 * @param {{seconds: number|string, nanos: number} | null | undefined} value the message
 * @returns {number | null} milliseconds
 */
export function toMillis(value) {
  if (!value) return null;
  return Number(value.seconds) * 1000 + value.nanos / 1e6;
}

/**
 * Reads a varint at `pos`.
 *
 * @param {Buffer} buffer the encoding
 * @param {number} pos where it starts
 * @returns {[number, number]} its value (exact up to 2^53) and the position after it
 */
function varint(buffer, pos) {
  let value = 0;
  for (let shift = 1; pos < buffer.length; shift *= 128) {
    const byte = buffer[pos++];
    value += (byte & 0x7f) * shift;
    if (byte < 0x80) return [value, pos];
  }
  throw new RangeError('truncated varint in a LeaseResponse');
}

/**
 * Splits an encoded message into its top-level fields, one encoding each.
 *
 * @param {Buffer} buffer the encoding
 * @returns {Buffer[]} the fields, in order
 */
function topLevelFields(buffer) {
  const fields = [];
  let pos = 0;
  while (pos < buffer.length) {
    const start = pos;
    let tag;
    [tag, pos] = varint(buffer, pos);
    const wireType = tag % 8;
    if (wireType === 0) [, pos] = varint(buffer, pos);
    else if (wireType === 1) pos += 8;
    else if (wireType === 5) pos += 4;
    else if (wireType === 2) {
      let length;
      [length, pos] = varint(buffer, pos);
      pos += length;
    } else throw new RangeError(`unexpected wire type ${wireType} in a LeaseResponse`);
    if (pos > buffer.length) throw new RangeError('truncated field in a LeaseResponse');
    fields.push(buffer.subarray(start, pos));
  }
  return fields;
}

/**
 * Wraps grpc-js's decoder of `LeaseResponse` so that a frame whose member occurs more than once
 * is merged as protobuf specifies: the broker writes frames of the same kind queued behind one
 * another as one message, by concatenating their encodings (`deliveries{A}` + `deliveries{B}`
 * means the deliveries of both). protobufjs keeps only the last occurrence of a singular
 * message field, which would silently drop deliveries and settle results.
 *
 * @param {(buffer: Buffer) => any} decode the stock decoder
 * @returns {(buffer: Buffer) => any} a decoder that merges repeated occurrences
 */
export function mergingDecoder(decode) {
  return (buffer) => {
    const fields = topLevelFields(buffer);
    if (fields.length <= 1) return decode(buffer);
    let merged = decode(fields[0]);
    for (const field of fields.slice(1)) {
      const next = decode(field);
      if (next.frame !== merged.frame) {
        merged = next; // a different member of the oneof: the last one set wins
        continue;
      }
      // The same member: its repeated fields are concatenated, the others take the last value.
      const into = merged[merged.frame];
      for (const [key, value] of Object.entries(next[next.frame] ?? {})) {
        into[key] = Array.isArray(value) ? [...(into[key] ?? []), ...value] : value;
      }
    }
    return merged;
  };
}
