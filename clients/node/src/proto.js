/**
 * Loads the taskbroker API from the `.proto` files at runtime: in the repository, from its
 * `proto/` directory, so a change to a `.proto` file is picked up on the next start; installed
 * from the npm tarball, from the `proto/` copy that `npm pack` puts into the package. Also
 * converts between milliseconds and `google.protobuf.Duration` / `Timestamp`.
 *
 * @module
 */

import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** The package's own copy (made by `npm pack`'s prepack script), else the repository's `proto/`. */
const PACKED_PROTO_DIR = fileURLToPath(new URL('../proto', import.meta.url));
/** The `proto/` directory the API is loaded from (this file is `clients/node/src/proto.js`). */
export const PROTO_DIR = existsSync(PACKED_PROTO_DIR)
  ? PACKED_PROTO_DIR
  : fileURLToPath(new URL('../../../proto', import.meta.url));

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
