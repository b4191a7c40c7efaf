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
 * How long, in all, enqueueMany waits out refusals that carry a RetryInfo (a queue's
 * enqueue_rate_limit, the client's request byte rate) before it gives up, as the Python SDK does.
 * Such a refusal stored nothing, so sending the call again is safe.
 */
const RETRY_INFO_BUDGET_MS = 30_000;

/**
 * Reads the varint at `offset` of a protobuf encoding.
 *
 * @param {Buffer} bytes
 * @param {number} offset
 * @returns {[number, number]} the value and the offset after it
 */
function varint(bytes, offset) {
  let value = 0;
  let scale = 1;
  for (let at = offset; at < bytes.length; at += 1) {
    value += (bytes[at] & 0x7f) * scale;
    if (bytes[at] < 0x80) return [value, at + 1];
    scale *= 128;
  }
  throw new RangeError('a truncated varint');
}

/**
 * The fields of a protobuf message, by number: varints as numbers, length-delimited fields as
 * Buffers (every occurrence, in order). Enough for google.rpc.Status and RetryInfo.
 *
 * @param {Buffer} bytes
 * @returns {Map<number, Array<number|Buffer>>}
 */
function fields(bytes) {
  /** @type {Map<number, Array<number|Buffer>>} */
  const found = new Map();
  let at = 0;
  while (at < bytes.length) {
    const [key, next] = varint(bytes, at);
    const number = Math.floor(key / 8);
    let value;
    switch (key % 8) {
      case 0:
        [value, at] = varint(bytes, next);
        break;
      case 2: {
        const [length, start] = varint(bytes, next);
        value = bytes.subarray(start, start + length);
        at = start + length;
        break;
      }
      case 1:
        at = next + 8;
        continue;
      case 5:
        at = next + 4;
        continue;
      default:
        throw new RangeError(`wire type ${key % 8}`);
    }
    found.set(number, [...(found.get(number) ?? []), value]);
  }
  return found;
}

/**
 * The retry delay a refusal carries (google.rpc.RetryInfo in its status details), in ms, or
 * null when it carries none.
 *
 * @param {any} error a grpc-js ServiceError
 * @returns {number|null}
 */
export function retryDelayMs(error) {
  const raw = error?.metadata?.get?.('grpc-status-details-bin')?.[0];
  if (!Buffer.isBuffer(raw)) return null;
  try {
    for (const detail of fields(raw).get(3) ?? []) {
      const any = fields(/** @type {Buffer} */ (detail));
      const typeUrl = String(any.get(1)?.[0] ?? '');
      if (!typeUrl.endsWith('/google.rpc.RetryInfo')) continue;
      const delay = fields(/** @type {Buffer} */ (any.get(2)?.[0] ?? Buffer.alloc(0))).get(1)?.[0];
      const duration = fields(/** @type {Buffer} */ (delay ?? Buffer.alloc(0)));
      const seconds = Number(duration.get(1)?.[0] ?? 0);
      const nanos = Number(duration.get(2)?.[0] ?? 0);
      return seconds * 1000 + Math.ceil(nanos / 1e6);
    }
  } catch {
    return null; // details we cannot read: the refusal stands as it is
  }
  return null;
}

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
    const response = await this.enqueueCall(specs);
    return response.results.map((/** @type {any} */ result) => ({
      taskId: result.task_id,
      duplicate: result.duplicate,
    }));
  }

  /**
   * One Enqueue call, sent again after the delay of each RESOURCE_EXHAUSTED refusal that
   * carries a RetryInfo, for up to RETRY_INFO_BUDGET_MS in all.
   *
   * @param {object[]} specs the TaskSpecs
   * @returns {Promise<any>} the EnqueueResponse
   */
  async enqueueCall(specs) {
    const started = Date.now();
    for (;;) {
      try {
        return await unary(this.client, 'Enqueue', { tasks: specs }, this.timeoutMs);
      } catch (error) {
        const delay = /** @type {any} */ (error)?.code === grpc.status.RESOURCE_EXHAUSTED
          ? retryDelayMs(error)
          : null;
        if (delay === null || Date.now() - started + delay > RETRY_INFO_BUDGET_MS) throw error;
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
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
