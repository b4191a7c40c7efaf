/**
 * taskbroker for Node.js: a `Producer` and a `Worker` speaking the broker's gRPC API, loaded at
 * runtime from the repository's `proto/` directory.
 *
 * @module
 */

export { AesGcmCodec, CodecError, Keyring, isEnvelope, parseHeader } from './codec.js';
export { connection, connectionOptionsFromEnv, isLocalTarget } from './credentials.js';
export { Producer } from './producer.js';
export { NonRetryableError, Worker } from './worker.js';
export { PROTO_DIR, taskbrokerV1, toDuration, toMillis } from './proto.js';
