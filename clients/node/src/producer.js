/**
 * Producer: enqueues tasks and reads them back through `BrokerService`.
 *
 * @module
 */

import * as grpc from '@grpc/grpc-js';

import { decodeTask, payloadContext } from './codec.js';
import { connection } from './credentials.js';
import { taskbrokerV1, toDuration } from './proto.js';

/**
 * @typedef {object} EnqueueOptions
 * @property {number} [priority] -1000 to 1000, higher first (default 0)
 * @property {number} [delayMs] run no earlier than this many milliseconds from now
 * @property {number} [maxAttempts] deliveries before the task is dead-lettered (default: broker's)
 * @property {number} [leaseMs] lease length for this task, overriding the worker's
 * @property {string} [idempotencyKey] a repeat within the broker's window returns the first id
 * @property {Record<string, string>} [headers] metadata handed to the worker unchanged
 * @property {string} [groupKey] the tenant the task belongs to (fair turns across keys)
 * @property {string[]} [dependsOn] ids of tasks this one waits for: it is stored
 *   `TASK_STATE_WAITING` and becomes pending once every one has succeeded
 * @property {number[]} [dependsOnPositions] with `enqueueMany`: 0-based positions, in the same
 *   call, of tasks this one waits for (a cycle is refused, and nothing is stored)
 * @property {'cancel' | 'run' | 'wait'} [onParentFailure] when a parent ends dead or cancelled:
 *   cancel this task (the default), run it anyway (its handler sees each parent's state), or
 *   keep it waiting until the dead parent is redriven and succeeds
 */

/**
 * A task for `enqueueMany`.
 *
 * @typedef {object} NewTask
 * @property {string} queue the queue, 1-128 of `[A-Za-z0-9_.-]`
 * @property {string} type the task type workers dispatch on
 * @property {Buffer|string} [payload] the payload (a string is sent as UTF-8)
 * @property {EnqueueOptions} [options]
 */

/** The broker's name of each `onParentFailure` value. */
const PARENT_FAILURE_POLICIES = {
  cancel: 'PARENT_FAILURE_POLICY_CANCEL',
  run: 'PARENT_FAILURE_POLICY_RUN',
  wait: 'PARENT_FAILURE_POLICY_WAIT',
};

/**
 * @typedef {object} EnqueueResult
 * @property {string} taskId the task's id, `<queue>:<26 characters>`
 * @property {boolean} duplicate true when the idempotency key matched an earlier task
 */

/**
 * Calls a unary method of a grpc-js client and resolves with its answer.
 *
 * @param {any} client a grpc-js service client
 * @param {string} method the RPC's name
 * @param {object} request the request message
 * @param {number} timeoutMs deadline for the call
 * @returns {Promise<any>} the response message; rejects with a grpc-js `ServiceError`
 *   (`code`, `details`, `metadata`)
 */
export function unary(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    const options = { deadline: Date.now() + timeoutMs };
    client[method](request, options, (/** @type {Error?} */ error, /** @type {any} */ response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** Enqueues tasks and reads them, over one channel. */
export class Producer {
  /**
   * @param {string} target the broker's `host:port`
   * @param {object} [options]
   * @param {import('./credentials.js').ConnectionOptions} [options.connection] TLS and a bearer
   *   token (see credentials.js); overrides credentials and clientOptions
   * @param {grpc.ChannelCredentials} [options.credentials] default: plaintext
   * @param {grpc.ClientOptions} [options.clientOptions] channel options and interceptors
   * @param {number} [options.timeoutMs] per-call deadline (default 10 s)
   * @param {import('./codec.js').PayloadCodec} [options.codec] encodes payloads on enqueue and
   *   decodes payloads and results on getTask (see codec.js)
   */
  constructor(target, options = {}) {
    const { timeoutMs = 10_000, codec } = options;
    const { credentials, clientOptions } = options.connection
      ? connection(target, options.connection)
      : {
          credentials: options.credentials ?? grpc.credentials.createInsecure(),
          clientOptions: options.clientOptions ?? {},
        };
    const { BrokerService } = taskbrokerV1();
    /** @type {any} */
    this.client = new BrokerService(target, credentials, clientOptions);
    this.timeoutMs = timeoutMs;
    this.codec = codec;
  }

  /**
   * Enqueues one task.
   *
   * @param {string} queue the queue, 1-128 of `[A-Za-z0-9_.-]`
   * @param {string} type the task type workers dispatch on
   * @param {Buffer|string} payload the payload (a string is sent as UTF-8)
   * @param {EnqueueOptions} [options]
   * @returns {Promise<EnqueueResult>} the task's id
   */
  async enqueue(queue, type, payload, options = {}) {
    const [result] = await this.enqueueMany([{ queue, type, payload, options }]);
    return result;
  }

  /**
   * Enqueues tasks in one call: the broker stores all of them or none. Tasks may wait for each
   * other by position (`options.dependsOnPositions`), so a whole graph goes in one call:
   *
   *     // two resizes, then one mail once both have succeeded
   *     const [a, b, mail] = await producer.enqueueMany([
   *       { queue: 'media', type: 'resize', payload: '1.jpg' },
   *       { queue: 'media', type: 'resize', payload: '2.jpg' },
   *       { queue: 'emails', type: 'send_album', options: { dependsOnPositions: [0, 1] } },
   *     ]);
   *
   * @param {NewTask[]} tasks 1 to 1,000 tasks
   * @returns {Promise<EnqueueResult[]>} one result per task, in the order given
   */
  async enqueueMany(tasks) {
    const specs = tasks.map(({ queue, type, payload = '', options = {} }) => {
      const policy = options.onParentFailure;
      if (policy !== undefined && !Object.hasOwn(PARENT_FAILURE_POLICIES, policy)) {
        throw new TypeError(`onParentFailure: 'cancel', 'run' or 'wait', not ${policy}`);
      }
      return {
        queue,
        type,
        payload: this.codec
          ? this.codec.encode(
              Buffer.from(payload),
              payloadContext(queue, type, options.idempotencyKey),
            )
          : Buffer.from(payload),
        headers: options.headers ?? {},
        priority: options.priority ?? 0,
        max_attempts: options.maxAttempts ?? 0,
        idempotency_key: options.idempotencyKey ?? '',
        group_key: options.groupKey ?? '',
        delay: options.delayMs === undefined ? null : toDuration(options.delayMs),
        lease_duration: options.leaseMs === undefined ? null : toDuration(options.leaseMs),
        depends_on: options.dependsOn ?? [],
        depends_on_positions: options.dependsOnPositions ?? [],
        parent_failure_policy: PARENT_FAILURE_POLICIES[policy] ?? 'PARENT_FAILURE_POLICY_UNSPECIFIED',
      };
    });
    const response = await unary(this.client, 'Enqueue', { tasks: specs }, this.timeoutMs);
    return response.results.map((/** @type {any} */ result) => ({
      taskId: result.task_id,
      duplicate: result.duplicate,
    }));
  }

  /**
   * Reads a task: its state (`'TASK_STATE_SUCCEEDED'`, ...), `attempt`, `result` (a Buffer),
   * `errors` of failed attempts, times, and its dependencies (`parent_ids`, `waiting_for`,
   * `parent_results`, `child_ids`, `child_count`). Field names are those of `Task` in
   * `task.proto`.
   *
   * @param {string} taskId the task's id
   * @returns {Promise<any>} the `Task` message; rejects with `NOT_FOUND` for an unknown id
   */
  async getTask(taskId) {
    const response = await unary(this.client, 'GetTask', { task_id: taskId }, this.timeoutMs);
    return decodeTask(this.codec, response.task);
  }

  /** Closes the channel. */
  close() {
    this.client.close();
  }
}
