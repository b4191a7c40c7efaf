#!/usr/bin/env node
/**
 * Enqueues one task and prints `{"task_id": ..., "duplicate": ...}` as one JSON line:
 *
 *   node bin/produce.js --target 127.0.0.1:50051 --queue jobs --type echo --payload hello
 *       [--max-attempts 3] [--lease-ms 300] [--depends-on ID]... [--on-parent-failure run]
 *       [--parents N [--child-type parents]] [--wait]
 *
 * `--depends-on` (repeatable) makes the task wait for those tasks. `--parents N` enqueues a
 * graph in one call instead: N tasks of the type (payloads `P-0` .. `P-N-1`), then one task of
 * `--child-type` that waits for all of them by position; the line then also has `task_ids`
 * (every task, the child last), and `task_id` is the child's. With `--wait` it then polls
 * GetTask until the task (the child) has finished and adds `state`, `attempt` and `result` (as
 * UTF-8) to the line. Exits 1 (message on stderr) when a call fails.
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
    'depends-on': { type: 'string', multiple: true },
    'on-parent-failure': { type: 'string' },
    parents: { type: 'string' },
    'child-type': { type: 'string', default: 'parents' },
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
  const options = {
    maxAttempts: values['max-attempts'] === undefined ? undefined : Number(values['max-attempts']),
    leaseMs: values['lease-ms'] === undefined ? undefined : Number(values['lease-ms']),
    dependsOn: values['depends-on'],
    onParentFailure: /** @type {any} */ (values['on-parent-failure']),
  };
  const { queue, type } = values;
  const count = values.parents === undefined ? 0 : Number(values.parents);
  /** @type {import('../src/producer.js').NewTask[]} */
  const tasks = Array.from({ length: count }, (_, i) => ({
    queue,
    type,
    payload: `${values.payload}-${i}`,
    options: { maxAttempts: options.maxAttempts, leaseMs: options.leaseMs },
  }));
  tasks.push(
    count === 0
      ? { queue, type, payload: values.payload, options }
      : {
          queue,
          type: values['child-type'],
          options: { ...options, dependsOnPositions: tasks.map((_, i) => i) },
        },
  );
  const results = await producer.enqueueMany(tasks);
  const { taskId, duplicate } = results[results.length - 1];
  /** @type {Record<string, unknown>} */
  const out = { task_id: taskId, duplicate };
  if (count > 0) out.task_ids = results.map((result) => result.taskId);
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
