/**
 * Worker: runs handlers for the tasks the broker pushes on one `Lease` stream.
 *
 * The protocol, as this file speaks it (see docs/writing-a-worker.md):
 * 1. open the stream and send `open{queues, worker_id, credits, lease_duration}`; the broker
 *    answers `opened`;
 * 2. the broker pushes `deliveries`, one credit each; the worker grants `credit{n}` as handlers
 *    finish, so held tasks plus unused credits never exceed its concurrency;
 * 3. each task's outcome goes back on the stream as `ack{result}` or `nack{error}`, answered by
 *    a `settle_results` frame; a running task's lease is extended at half its length;
 * 4. `revoked` names leases of cancelled tasks (their handlers are told through `ctx.signal` and
 *    their outcome is not sent); `drain` means the broker is shutting down: stop asking for work,
 *    finish what runs, half-close;
 * 5. on SIGTERM/SIGINT the worker does the same, with a grace period, then nacks what is left.
 *
 * There is no reconnect loop: `run()` rejects when the stream fails, and returns after a drain
 * or a shutdown; tasks the stream held go back to the queue (counting an attempt).
 *
 * @module
 */

import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { CodecError, openPayload, sealResult } from './codec.js';
import { taskbrokerV1, toDuration, toMillis } from './proto.js';

/**
 * Everything a handler knows about the task it runs.
 *
 * @typedef {object} TaskContext
 * @property {string} taskId the task's id
 * @property {string} type the task type
 * @property {string} queue the queue it came from
 * @property {number} attempt this delivery's number, from 1; grows with every lease, so it can
 *   fence the handler's own writes
 * @property {number} maxAttempts deliveries allowed before the task is dead-lettered
 * @property {Record<string, string>} headers headers as enqueued
 * @property {string} leaseId the lease this delivery holds
 * @property {AbortSignal} signal aborted when the lease is revoked (the task was cancelled) or
 *   lost, or when the shutdown grace period runs out; `signal.reason` says which
 */

/**
 * A task handler. What it returns (a Buffer, a string or nothing) is acked as the task's
 * result; what it throws is nacked with the error's message: a `NonRetryableError` dead-letters
 * the task, anything else is retried with the broker's backoff.
 *
 * @callback Handler
 * @param {Buffer} payload the task's payload
 * @param {TaskContext} ctx the task's context
 * @returns {Promise<Buffer | Uint8Array | string | void>} the result
 */

/**
 * @typedef {object} WorkerOptions
 * @property {string} target the broker's `host:port`
 * @property {string[]} queues queues to take tasks from (1 to 64)
 * @property {Record<string, Handler>} handlers one handler per task type; a task of any other
 *   type is dead-lettered
 * @property {number} [concurrency] tasks run at once, and so the credits granted (default 1)
 * @property {number} [leaseMs] lease length to ask for, 10 ms to 12 h (default 30 s); a task's
 *   own lease length wins
 * @property {number} [shutdownGraceMs] how long running tasks get to finish at shutdown before
 *   they are nacked for a retry (default 10 s)
 * @property {string} [workerId] names the worker in the broker's logs (default `host:pid`)
 * @property {grpc.ChannelCredentials} [credentials] default: plaintext
 * @property {Pick<Console, 'info' | 'warn' | 'error'>} [logger] default: `console`
 * @property {import('./codec.js').PayloadCodec} [codec] decodes payloads before the handler
 *   (one it cannot decode is dead-lettered) and encodes results (see codec.js)
 */

/** Thrown by a handler to dead-letter its task at once, without further attempts. */
export class NonRetryableError extends Error {
  name = 'NonRetryableError';
}

/** Which SettleResult.kind answers which frame. */
const SETTLE_KINDS = {
  ack: 'SETTLE_KIND_ACK',
  nack: 'SETTLE_KIND_NACK',
  extend: 'SETTLE_KIND_EXTEND',
};
/** How long to wait for `opened`, and for the broker to end a half-closed stream. */
const OPEN_TIMEOUT_MS = 10_000;
const CLOSE_TIMEOUT_MS = 5_000;
/** After the grace period, how long the nacks of unfinished tasks may take. */
const ABORT_SETTLE_MS = 2_000;
/** A settlement answered UNAVAILABLE ("outcome unknown, may be retried") is retried this often. */
const SETTLE_RETRIES = 3;
const SETTLE_RETRY_MS = 200;

/**
 * A handler's return value as the bytes of an ack.
 *
 * @param {unknown} value what the handler returned
 * @returns {Buffer} the result
 */
function toBytes(value) {
  if (value === undefined || value === null) return Buffer.alloc(0);
  if (typeof value === 'string' || value instanceof Uint8Array) return Buffer.from(value);
  throw new TypeError(`a handler must return a Buffer, a string or nothing, not ${typeof value}`);
}

/** Runs handlers for the tasks of some queues, as the broker leases them. */
export class Worker {
  /** @param {WorkerOptions} options */
  constructor(options) {
    const {
      queues,
      handlers,
      concurrency = 1,
      leaseMs = 30_000,
      shutdownGraceMs = 10_000,
    } = options;
    if (!queues?.length) throw new RangeError('queues: give at least one queue');
    if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 10_000) {
      throw new RangeError('concurrency must be an integer from 1 to 10,000');
    }
    if (!(leaseMs >= 10 && leaseMs <= 12 * 3600_000)) {
      throw new RangeError('leaseMs must be 10 ms to 12 h');
    }
    this.options = {
      target: options.target,
      queues,
      handlers,
      concurrency,
      leaseMs,
      shutdownGraceMs,
      workerId: options.workerId ?? `${os.hostname()}:${process.pid}`,
      credentials: options.credentials ?? grpc.credentials.createInsecure(),
      logger: options.logger ?? console,
      codec: options.codec,
    };
    /** Tasks finished with (any outcome). */
    this.processed = 0;
    /** Settlements the broker refused because the lease was no longer current. */
    this.staleSettlements = 0;
    /** @type {LeaseSession | null} */
    this.session = null;
  }

  /**
   * Opens a Lease stream and runs handlers until the broker drains the stream or `shutdown()`
   * (or SIGTERM/SIGINT, when `handleSignals`) stops the worker.
   *
   * @param {object} [options]
   * @param {boolean} [options.handleSignals] SIGTERM/SIGINT shut the worker down gracefully
   *   (a second signal skips the rest of the grace period); default true
   * @returns {Promise<void>} resolves once the stream has ended cleanly; rejects with the
   *   grpc-js error when the broker refused or lost the stream
   */
  async run({ handleSignals = true } = {}) {
    if (this.session) throw new Error('the worker is already running');
    const session = new LeaseSession(this);
    this.session = session;
    const onSignal = (/** @type {NodeJS.Signals} */ signal) => {
      this.options.logger.info(`${signal}: shutting down gracefully`);
      void session.shutdown();
    };
    if (handleSignals) {
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
    }
    try {
      await session.run();
    } finally {
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
      this.session = null;
    }
  }

  /**
   * Stops gracefully: no more credits, running tasks get the grace period to finish (then they
   * are nacked for a retry), the stream is half-closed. A no-op when not running.
   *
   * @returns {Promise<void>} resolves once the worker has stopped
   */
  async shutdown() {
    await this.session?.shutdown();
  }
}

/**
 * One running task: its context, its lease-extension timer and whether it may still settle.
 *
 * @typedef {object} TaskRun
 * @property {any} delivery the `Delivery` message
 * @property {AbortController} controller aborts `ctx.signal`
 * @property {number} leaseMs the lease length in force for it
 * @property {NodeJS.Timeout | undefined} timer the next extension
 * @property {boolean} settled an outcome was sent, or none will be (revoked, given up): no
 *   more extensions
 */

/** One Lease stream, from `open` to its status. */
class LeaseSession {
  /** @param {Worker} worker */
  constructor(worker) {
    this.worker = worker;
    this.options = worker.options;
    this.log = worker.options.logger;
    /** @type {any} */
    this.client = null;
    /** @type {any} grpc-js ClientDuplexStream */
    this.call = null;
    this.streamId = '';
    this.leaseMs = this.options.leaseMs;
    /** Credits granted and not yet used by a delivery. */
    this.unusedCredits = 0;
    /** @type {Map<string, TaskRun>} running tasks by lease id */
    this.runs = new Map();
    /** @type {Map<string, Array<{resolve: (r: any) => void, reject: (e: Error) => void}>>} */
    this.pending = new Map();
    /** @type {Array<() => void>} resolved when nothing runs */
    this.idleWaiters = [];
    this.draining = false;
    this.stopping = false;
    this.halfClosed = false;
    this.ended = false;
    /** @type {Error | null} */
    this.error = null;
    /** @type {Promise<void> | null} */
    this.stopped = null;
    /** @type {() => void} */
    this.hurry = () => {};
    /** @type {() => void} */
    this.markEnded = () => {};
    /** Resolves when the stream has ended. */
    this.endedPromise = new Promise((resolve) => {
      this.markEnded = () => resolve(undefined);
    });
  }

  /** @returns {Promise<void>} see Worker.run */
  async run() {
    const { BrokerService } = taskbrokerV1();
    this.client = new BrokerService(this.options.target, this.options.credentials);
    const call = this.client.Lease();
    this.call = call;
    /** @type {Promise<any>} */
    const status = new Promise((resolve) => call.on('status', resolve));
    call.on('error', (/** @type {Error} */ error) => {
      this.error ??= error;
    });
    try {
      await this.open(call, status);
      const { code, details } = await status;
      this.end(new Error('the lease stream ended'));
      if (code !== grpc.status.OK && !(this.halfClosed && code === grpc.status.CANCELLED)) {
        throw this.error ?? new Error(`lease stream ended: ${code} ${details}`);
      }
      if (!this.draining && !this.stopping) this.log.warn('the broker ended the lease stream');
      this.log.info(`lease stream ${this.streamId} closed`);
    } finally {
      this.end(new Error('the lease stream ended'));
      call.cancel();
      this.client.close();
    }
  }

  /**
   * Sends `open` and waits for `opened`; from then on frames go to `dispatch`.
   *
   * @param {any} call the Lease call
   * @param {Promise<any>} status settles when the call ends
   */
  async open(call, status) {
    const { queues, workerId, concurrency } = this.options;
    /** @type {Promise<void>} */
    const opened = new Promise((resolve, reject) => {
      // One listener from the start, handling `opened` synchronously: the frames after it may
      // arrive in the same read.
      call.on('data', (/** @type {any} */ response) => {
        if (this.streamId) {
          this.dispatch(response);
        } else if (response.frame === 'opened') {
          this.streamId = response.opened.stream_id || '?';
          this.leaseMs = toMillis(response.opened.lease_duration) ?? this.leaseMs;
          resolve();
        } else {
          reject(new Error(`expected opened, got ${response.frame}`));
        }
      });
      status.then(() => reject(this.error ?? new Error('the broker ended the stream unopened')));
      setTimeout(() => reject(new Error('no answer to open in time')), OPEN_TIMEOUT_MS).unref();
    });
    this.unusedCredits = concurrency;
    call.write({
      open: {
        queues,
        worker_id: workerId,
        credits: concurrency,
        lease_duration: toDuration(this.options.leaseMs),
      },
    });
    await opened;
    this.log.info(
      `lease stream ${this.streamId} open on ${queues.join(',')} (credits ${concurrency})`,
    );
  }

  /**
   * Handles one frame from the broker.
   *
   * @param {any} response a `LeaseResponse`
   */
  dispatch(response) {
    switch (response.frame) {
      case 'deliveries':
        this.unusedCredits = Math.max(
          0,
          this.unusedCredits - response.deliveries.deliveries.length,
        );
        for (const delivery of response.deliveries.deliveries) this.start(delivery);
        break;
      case 'settle_results':
        for (const result of response.settle_results.results) this.resolve(result);
        break;
      case 'revoked':
        for (const lease of response.revoked.leases) this.revoke(lease);
        break;
      case 'drain':
        this.log.info(`lease stream ${this.streamId}: the broker is draining; finishing up`);
        this.draining = true;
        this.unusedCredits = 0;
        void this.whenIdle().then(() => this.halfClose());
        break;
      default:
        this.log.warn(`ignoring an unknown frame: ${response.frame}`);
    }
  }

  /**
   * Writes a frame unless the stream is closed for writing.
   *
   * @param {object} request a `LeaseRequest`
   * @returns {boolean} whether it was written
   */
  send(request) {
    if (this.halfClosed || this.ended) return false;
    this.call.write(request);
    return true;
  }

  /** Grants credits for the slots that are free, unless the worker is winding down. */
  topUp() {
    if (this.draining || this.stopping) return;
    const n = this.options.concurrency - this.runs.size - this.unusedCredits;
    if (n > 0 && this.send({ credit: { credits: n } })) this.unusedCredits += n;
  }

  // --- running tasks ------------------------------------------------------------------------

  /** @param {any} delivery a `Delivery` */
  start(delivery) {
    if (this.halfClosed) return; // the broker returns it to the queue when the stream ends
    const { task, lease_id: leaseId } = delivery;
    /** @type {TaskRun} */
    const run = {
      delivery,
      controller: new AbortController(),
      leaseMs: toMillis(task.lease_duration) ?? this.leaseMs,
      timer: undefined,
      settled: false,
    };
    this.runs.set(leaseId, run);
    this.scheduleExtend(run, toMillis(delivery.lease_expire_time) ?? Date.now());
    void this.execute(run);
  }

  /**
   * Runs a task's handler and settles its outcome on the stream.
   *
   * @param {TaskRun} run the task
   */
  async execute(run) {
    const { task, lease_id: leaseId } = run.delivery;
    const handler = this.options.handlers[task.type];
    /** @type {TaskContext} */
    const ctx = {
      taskId: task.id,
      type: task.type,
      queue: task.queue,
      attempt: task.attempt,
      maxAttempts: task.max_attempts,
      headers: task.headers,
      leaseId,
      signal: run.controller.signal,
    };
    const ids = { task_id: task.id, lease_id: leaseId };
    /** @type {'ack' | 'nack'} */
    let kind = 'ack';
    /** @type {object} */
    let frame;
    let error = '';
    try {
      if (!handler) {
        const types = Object.keys(this.options.handlers).join(', ');
        throw new NonRetryableError(`no handler for task type ${task.type} (handles ${types})`);
      }
      const result = toBytes(await handler(openPayload(this.options.codec, task), ctx));
      frame = { result: sealResult(this.options.codec, task, result) };
    } catch (thrown) {
      kind = 'nack';
      error = thrown instanceof Error ? thrown.message : String(thrown);
      // A payload no attempt could decode (unknown key id, failed tag) is dead-lettered too.
      const deadLetter = thrown instanceof NonRetryableError || thrown instanceof CodecError;
      frame = { error, dead_letter: deadLetter };
    }
    clearTimeout(run.timer);
    if (run.settled) {
      this.finish(run); // revoked, or given up at shutdown: nothing to settle
      return;
    }
    run.settled = true;
    try {
      let result = await this.settle(kind, { ...ids, ...frame });
      if (kind === 'ack' && result.outcome === 'SETTLE_OUTCOME_INVALID_ARGUMENT') {
        // For example a result over the payload limit: fail the attempt rather than hold it.
        kind = 'nack';
        error = `ack refused: ${result.message}`;
        result = await this.settle(kind, { ...ids, error });
      }
      this.report(run, kind, result, error);
    } catch (failure) {
      this.log.warn(`task ${task.id}: ${kind} not answered (${failure}); it will be redelivered`);
    } finally {
      this.finish(run);
    }
  }

  /**
   * Logs a settlement's outcome.
   *
   * @param {TaskRun} run the task
   * @param {string} kind 'ack' or 'nack'
   * @param {any} result its `SettleResult`
   * @param {string} [error] a nack's error message
   */
  report(run, kind, result, error = '') {
    const { id, type, attempt } = run.delivery.task;
    if (result.outcome === 'SETTLE_OUTCOME_OK') {
      const detail = kind === 'nack' ? ` (${error})` : '';
      this.log.info(`task ${id} (${type}) attempt ${attempt}: ${kind}${detail}`);
    } else if (
      ['SETTLE_OUTCOME_LEASE_STALE', 'SETTLE_OUTCOME_NOT_FOUND'].includes(result.outcome)
    ) {
      this.worker.staleSettlements += 1;
      this.log.warn(
        `task ${id}: ${kind} refused, the lease is no longer current; it may run again`,
      );
    } else {
      this.log.error(`task ${id}: ${kind} failed: ${result.outcome} ${result.message}`);
    }
  }

  /** @param {TaskRun} run a task whose run is over */
  finish(run) {
    run.settled = true;
    clearTimeout(run.timer);
    if (!this.runs.delete(run.delivery.lease_id)) return;
    this.worker.processed += 1;
    this.topUp();
    if (this.runs.size === 0) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** @returns {Promise<void>} resolves once no task runs */
  whenIdle() {
    if (this.runs.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** @param {any} lease a `RevokedLease` */
  revoke(lease) {
    const run = this.runs.get(lease.lease_id);
    if (!run) return;
    this.log.info(`task ${lease.task_id}: lease revoked (${lease.reason}); not settling it`);
    run.settled = true; // its slot stays taken until the handler returns
    clearTimeout(run.timer);
    run.controller.abort(new Error(`lease revoked: ${lease.reason || 'revoked'}`));
  }

  // --- leases -------------------------------------------------------------------------------

  /**
   * Extends a task's lease when half of what is left of it has passed. The expiry is on the
   * broker's clock: clamping to the lease length bounds the effect of clock skew.
   *
   * @param {TaskRun} run the task
   * @param {number} expireMs when its lease expires (epoch ms)
   */
  scheduleExtend(run, expireMs) {
    const remaining = Math.min(Math.max(expireMs - Date.now(), 0), run.leaseMs);
    run.timer = setTimeout(() => void this.extend(run), Math.max(remaining / 2, 5));
  }

  /** @param {TaskRun} run the task whose lease to extend */
  async extend(run) {
    if (run.settled) return;
    const { task, lease_id: leaseId } = run.delivery;
    let result;
    try {
      result = await this.settle('extend', { task_id: task.id, lease_id: leaseId });
    } catch {
      return; // the stream ended: the broker has given the task back already
    }
    if (run.settled) return;
    if (result.outcome === 'SETTLE_OUTCOME_OK') {
      this.scheduleExtend(run, toMillis(result.lease_expire_time) ?? Date.now());
    } else if (
      ['SETTLE_OUTCOME_LEASE_STALE', 'SETTLE_OUTCOME_NOT_FOUND'].includes(result.outcome)
    ) {
      this.log.warn(`task ${task.id}: lease lost (${result.message})`);
      run.controller.abort(new Error('lease lost'));
    } else {
      this.log.error(`task ${task.id}: extension failed: ${result.outcome} ${result.message}`);
    }
  }

  // --- settlements --------------------------------------------------------------------------

  /**
   * Sends an ack, nack or extend frame and waits for its SettleResult (answers are matched by
   * lease id and kind). UNAVAILABLE, "outcome unknown", is retried a few times.
   *
   * @param {'ack' | 'nack' | 'extend'} kind the frame
   * @param {{lease_id: string, [field: string]: unknown}} frame its message
   * @returns {Promise<any>} the `SettleResult`; rejects when the stream ends first
   */
  async settle(kind, frame) {
    for (let attempt = 0; ; attempt += 1) {
      const key = `${frame.lease_id}/${SETTLE_KINDS[kind]}`;
      /** @type {Promise<any>} */
      const answer = new Promise((resolve, reject) => {
        if (!this.send({ [kind]: frame })) {
          reject(new Error('the lease stream is closed'));
          return;
        }
        const waiting = this.pending.get(key) ?? [];
        waiting.push({ resolve, reject });
        this.pending.set(key, waiting);
      });
      const result = await answer;
      if (result.outcome !== 'SETTLE_OUTCOME_UNAVAILABLE' || attempt >= SETTLE_RETRIES) {
        return result;
      }
      await sleep(SETTLE_RETRY_MS * (attempt + 1));
    }
  }

  /** @param {any} result a `SettleResult` */
  resolve(result) {
    const key = `${result.lease_id}/${result.kind}`;
    const waiting = this.pending.get(key);
    const next = waiting?.shift();
    if (waiting?.length === 0) this.pending.delete(key);
    next?.resolve(result);
  }

  // --- closing ------------------------------------------------------------------------------

  /** Tells the broker nothing more will be sent; it answers what it got, then ends the stream. */
  halfClose() {
    if (this.halfClosed || this.ended) return;
    this.halfClosed = true;
    this.call.end();
    setTimeout(() => {
      if (!this.ended) {
        this.log.warn(`lease stream ${this.streamId} did not end in time; dropping it`);
        this.call.cancel();
      }
    }, CLOSE_TIMEOUT_MS).unref();
  }

  /**
   * The stream has ended: unanswered settlements fail and running handlers are told.
   *
   * @param {Error} reason why
   */
  end(reason) {
    if (this.ended) return;
    this.ended = true;
    for (const waiting of this.pending.values()) for (const { reject } of waiting) reject(reason);
    this.pending.clear();
    for (const run of this.runs.values()) {
      run.controller.abort(reason);
      this.finish(run);
    }
    this.hurry();
    this.markEnded();
  }

  /** @returns {Promise<void>} see Worker.shutdown */
  shutdown() {
    if (this.stopped) {
      this.hurry(); // a second request skips what is left of the grace period
      return this.stopped;
    }
    this.stopped = this.stop();
    return this.stopped;
  }

  /** @returns {Promise<void>} stops as `shutdown` describes */
  async stop() {
    this.stopping = true;
    const { shutdownGraceMs } = this.options;
    if (this.runs.size > 0) {
      this.log.info(
        `shutting down: waiting up to ${shutdownGraceMs} ms for ${this.runs.size} tasks`,
      );
    }
    const hurried = new Promise((resolve) => {
      this.hurry = () => resolve(undefined);
    });
    const timer = setTimeout(this.hurry, shutdownGraceMs);
    await Promise.race([this.whenIdle(), hurried]);
    clearTimeout(timer);
    const unfinished = [...this.runs.values()];
    if (unfinished.length > 0 && !this.ended) {
      this.log.warn(`shutting down: nacking ${unfinished.length} unfinished tasks`);
      const nacks = unfinished.map((run) => this.giveUp(run));
      await Promise.race([
        Promise.allSettled(nacks),
        sleep(ABORT_SETTLE_MS, undefined, { ref: false }),
      ]);
    }
    this.halfClose();
    await this.endedPromise;
  }

  /**
   * Stops waiting for a task's handler and nacks it, to be retried.
   *
   * @param {TaskRun} run the task
   */
  async giveUp(run) {
    const { task, lease_id: leaseId } = run.delivery;
    run.settled = true;
    clearTimeout(run.timer);
    run.controller.abort(new Error('worker shut down'));
    try {
      const error = 'worker shut down before the task finished';
      const frame = { task_id: task.id, lease_id: leaseId, error };
      this.report(run, 'nack', await this.settle('nack', frame), error);
    } finally {
      this.finish(run);
    }
  }
}
