#!/usr/bin/env node
/**
 * A Node.js worker with a few demonstration handlers (used by the interop tests):
 *
 *   node bin/worker.js --target 127.0.0.1:50051 --queue jobs [--queue more]
 *       [--concurrency 4] [--lease-ms 30000] [--grace-ms 10000] [--worker-id node-1]
 *
 * Handlers: `echo` returns the payload; `upper` returns it uppercased; `fail_once` fails its
 * first attempt and returns the payload on the next; `reject` fails for good (dead letter);
 * `sleep` sleeps for the payload's number of milliseconds (and stops early when its lease is
 * lost or revoked); `parents` returns what it was given of its parents (`ctx.parentResults`) as
 * JSON: `[{"task_id", "state", "result" (UTF-8)}, ...]`. Logs go to stderr. The worker reconnects when its stream breaks and moves to
 * a new stream when the broker drains; it exits 0 after a graceful shutdown (SIGTERM/SIGINT), 1
 * when the broker refuses the stream for good (a bad queue name, for example).
 *
 * With TASKBROKER_ENCRYPTION_KEYS (or TASKBROKER_ENCRYPTION_KEYS_FILE) set, payloads are
 * decrypted and results encrypted (docs/encryption.md). TLS and a bearer token come from the
 * TASKBROKER_TLS_* and TASKBROKER_TOKEN(_FILE) variables, as for bin/produce.js.
 */

import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';

import {
  AesGcmCodec,
  Keyring,
  NonRetryableError,
  Worker,
  connectionOptionsFromEnv,
} from '../src/index.js';

/** @type {Record<string, import('../src/worker.js').Handler>} */
const handlers = {
  echo: async (payload) => payload,
  upper: async (payload) => payload.toString('utf8').toUpperCase(),
  fail_once: async (payload, ctx) => {
    if (ctx.attempt === 1) throw new Error('attempt 1 fails on purpose');
    return payload;
  },
  reject: async () => {
    throw new NonRetryableError('this task can never succeed');
  },
  sleep: async (payload, ctx) => {
    const ms = Number(payload.toString('utf8'));
    // Says the delivery arrived: a task the broker shows LEASED may still be on its way.
    line('INFO')(`task ${ctx.taskId} (sleep) attempt ${ctx.attempt}: started`);
    await sleep(ms, undefined, { signal: ctx.signal });
    return `slept ${ms} ms`;
  },
  parents: async (_payload, ctx) =>
    JSON.stringify(
      ctx.parentResults.map((parent) => ({
        task_id: parent.taskId,
        state: parent.state,
        result: parent.result.toString('utf8'),
      })),
    ),
};

const { values } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    queue: { type: 'string', multiple: true },
    concurrency: { type: 'string', default: '4' },
    'lease-ms': { type: 'string', default: '30000' },
    'grace-ms': { type: 'string', default: '10000' },
    'worker-id': { type: 'string' },
  },
});

const workerId = values['worker-id'];
/** @returns {boolean} whether the environment holds a keyring */
const encrypting = () =>
  Boolean(process.env.TASKBROKER_ENCRYPTION_KEYS || process.env.TASKBROKER_ENCRYPTION_KEYS_FILE);
/** @param {string} level @returns {(message: string) => void} a line logger on stderr */
const line = (level) => (message) =>
  process.stderr.write(
    `${new Date().toISOString()} ${workerId ?? 'node-worker'} ${level} ${message}\n`,
  );

/** @param {unknown} error @returns {never} */
function refuse(error) {
  process.stderr.write(`${/** @type {Error} */ (error).message}\n`);
  process.exit(2);
}

let worker;
try {
  worker = new Worker({
    connection: connectionOptionsFromEnv(),
    target: values.target,
    queues: values.queue ?? ['default'],
    handlers,
    concurrency: Number(values.concurrency),
    leaseMs: Number(values['lease-ms']),
    shutdownGraceMs: Number(values['grace-ms']),
    workerId,
    logger: { info: line('INFO'), warn: line('WARN'), error: line('ERROR') },
    codec: encrypting() ? new AesGcmCodec(Keyring.fromEnv()) : undefined,
  });
} catch (error) {
  refuse(error); // a TLS or token file that cannot be used
}

try {
  await worker.run();
  line('INFO')(
    `stopped after ${worker.processed} tasks: ${worker.reconnects} reconnects, ` +
      `${worker.resumedLeases} leases resumed, ${worker.lostLeases} lost, ` +
      `${worker.staleSettlements} stale settlements`,
  );
} catch (error) {
  line('ERROR')(`worker failed: ${error instanceof Error ? error.message : error}`);
  process.exitCode = 1;
}
// Handlers given up at shutdown may still be running: do not wait for them.
process.exit();
