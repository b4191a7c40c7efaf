#!/usr/bin/env node
/**
 * Enqueues one task and prints `{"task_id": ..., "duplicate": ...}` as one JSON line:
 *
 *   node bin/produce.js --target 127.0.0.1:50051 --queue jobs --type echo --payload hello
 *       [--max-attempts 3] [--lease-ms 300] [--wait]
 *
 * With `--wait` it then polls GetTask until the task has finished and adds `state`, `attempt`
 * and `result` (as UTF-8) to the line. Exits 1 (message on stderr) when a call fails.
 *
 * With TASKBROKER_ENCRYPTION_KEYS (or TASKBROKER_ENCRYPTION_KEYS_FILE) set, the payload is
 * encrypted and the result decrypted (docs/encryption.md). TLS and a bearer token come from
 * TASKBROKER_TLS_CA, TASKBROKER_TLS_CLIENT_CERT, TASKBROKER_TLS_CLIENT_KEY,
 * TASKBROKER_TLS_SERVER_NAME, TASKBROKER_TOKEN or TASKBROKER_TOKEN_FILE (src/credentials.js).
 */

import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';

import { AesGcmCodec, Keyring, Producer, connectionOptionsFromEnv } from '../src/index.js';

const FINISHED = new Set(['TASK_STATE_SUCCEEDED', 'TASK_STATE_DEAD', 'TASK_STATE_CANCELLED']);

const { values } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    queue: { type: 'string' },
    type: { type: 'string' },
    payload: { type: 'string', default: '' },
    'max-attempts': { type: 'string' },
    'lease-ms': { type: 'string' },
    wait: { type: 'boolean', default: false },
  },
});
if (!values.queue || !values.type) {
  process.stderr.write('usage: produce.js --target HOST:PORT --queue Q --type T [--payload P]\n');
  process.exit(2);
}

const { TASKBROKER_ENCRYPTION_KEYS: keys, TASKBROKER_ENCRYPTION_KEYS_FILE: keyFile } = process.env;
const codec = keys || keyFile ? new AesGcmCodec(Keyring.fromEnv()) : undefined;
let producer;
try {
  producer = new Producer(values.target, { codec, connection: connectionOptionsFromEnv() });
} catch (error) {
  process.stderr.write(`${/** @type {Error} */ (error).message}\n`); // a TLS or token file
  process.exit(2);
}
try {
  const { taskId, duplicate } = await producer.enqueue(values.queue, values.type, values.payload, {
    maxAttempts: values['max-attempts'] === undefined ? undefined : Number(values['max-attempts']),
    leaseMs: values['lease-ms'] === undefined ? undefined : Number(values['lease-ms']),
  });
  /** @type {Record<string, unknown>} */
  const out = { task_id: taskId, duplicate };
  if (values.wait) {
    let task = await producer.getTask(taskId);
    while (!FINISHED.has(task.state)) {
      await sleep(20);
      task = await producer.getTask(taskId);
    }
    Object.assign(out, {
      state: task.state,
      attempt: task.attempt,
      result: task.result.toString('utf8'),
    });
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
} catch (error) {
  const { code, details, message } = /** @type {any} */ (error);
  process.stderr.write(`produce failed: ${details ?? message} (code ${code})\n`);
  process.exitCode = 1;
} finally {
  producer.close();
}
