/**
 * Worker: runs handlers for the tasks the broker pushes on a `Lease` stream, and keeps such a
 * stream open: it reconnects when one breaks and moves to a new one when the broker drains.
 *
 * The protocol, as this file speaks it (see docs/writing-a-worker.md):
 * 1. open a stream and send `open{queues, worker_id, credits, lease_duration, resume}`; the
 *    broker answers `opened`, with one `resumed` result per lease listed in `resume`;
 * 2. the broker pushes `deliveries`, one credit each; the worker grants `credit{n}` as handlers
 *    finish, so held tasks plus unused credits never exceed its concurrency;
 * 3. each task's outcome goes back as `ack{result}` or `nack{error}`, answered by a
 *    `settle_results` frame; a running task's lease is extended at half its length;
 * 4. `revoked` names leases of cancelled tasks (their handlers are told through `ctx.signal` and
 *    their outcome is not sent);
 * 5. when a stream breaks, handlers keep running: the worker reconnects (at once after a stream
 *    that had been up a while, then with exponential backoff and equal jitter up to 5 s) and
 *    lists their leases in `open.resume`. A lease the broker still holds for it comes back with
 *    the same lease id and attempt; one it no longer does (re-leased elsewhere, reclaimed,
 *    settled or cancelled) aborts its handler with "lease lost", and no outcome is sent.
 *    Settlements the broken stream had not answered are sent again on the new one (a repeat of
 *    an applied ack or nack answers OK, `already_settled`);
 * 6. `drain` means that broker is shutting down: the worker opens a new stream at once (the
 *    channel reaches another replica), moves its leases there the same way, and half-closes the
 *    old one once nothing depends on it;
 * 7. on SIGTERM/SIGINT the worker stops asking for work, gives running tasks a grace period,
 *    nacks what is left and half-closes.
 *
 * `run()` returns after a shutdown, and rejects only when the broker refuses the stream for
 * good (INVALID_ARGUMENT, UNIMPLEMENTED, UNAUTHENTICATED, PERMISSION_DENIED): retrying would
 * not help.
 *
 * @module
 */

import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { CodecError, openPayload, sealResult } from './codec.js';
import { connection } from './credentials.js';
import { LeaseStream, StreamLost } from './lease_stream.js';
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
 * @property {string[]} parentIds the tasks this one depends on, in order (empty when none)
 * @property {ParentResult[]} parentResults how each parent ended, in parent order: a fan-in
 *   handler reads the fan-out's results here
 * @property {AbortSignal} signal aborted when the lease is revoked (the task was cancelled) or
 *   lost, or when the shutdown grace period runs out; `signal.reason` says which
 */

/**
 * How one parent of a task ended.
 *
 * @typedef {object} ParentResult
 * @property {string} taskId the parent's id
 * @property {string} state `'TASK_STATE_SUCCEEDED'`, or (with `onParentFailure: 'run'`)
 *   `'TASK_STATE_DEAD'` or `'TASK_STATE_CANCELLED'`
 * @property {Buffer} result what the parent's worker acked with (as its worker encoded it)
 * @property {boolean} resultOmitted true when the broker left the result out (the results
 *   carried with one task total at most 1 MiB); read the parent with `getTask` for it
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
 * @property {import('./credentials.js').ConnectionOptions} [connection] TLS and a bearer token
 *   (see credentials.js); overrides credentials and clientOptions
 * @property {grpc.ChannelCredentials} [credentials] default: plaintext
 * @property {grpc.ClientOptions} [clientOptions] more channel options, and interceptors
 * @property {Pick<Console, 'info' | 'warn' | 'error'>} [logger] default: `console`
 * @property {import('./codec.js').PayloadCodec} [codec] decodes payloads before the handler
 *   (one it cannot decode is dead-lettered) and encodes results (see codec.js)
 */

/** Thrown by a handler to dead-letter its task at once, without further attempts. */
export class NonRetryableError extends Error {
  name = 'NonRetryableError';
}

/** How long to wait for `opened`, and for the broker to end a half-closed stream. */
const OPEN_TIMEOUT_MS = 10_000;
const CLOSE_TIMEOUT_MS = 5_000;
/** After the grace period, how long the nacks of unfinished tasks may take. */
const ABORT_SETTLE_MS = 2_000;
/** A settlement answered UNAVAILABLE ("outcome unknown, may be retried") is retried this often. */
const SETTLE_RETRIES = 3;
const SETTLE_RETRY_MS = 200;
/** Reconnect backoff: 100 ms doubling to 5 s, with equal jitter. */
const RECONNECT_INITIAL_MS = 100;
const RECONNECT_MAX_MS = 5_000;
/** A stream that lived this long before it broke is retried at once (a blip, a rotation). */
const STABLE_STREAM_MS = 5_000;
/** Open failures that retrying cannot fix (a bad queue name, no such service, no access). */
const FATAL_OPEN_CODES = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.UNIMPLEMENTED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
]);
/** Settle outcomes that mean the lease is no longer this worker's. */
const LOST_OUTCOMES = new Set(['SETTLE_OUTCOME_LEASE_STALE', 'SETTLE_OUTCOME_NOT_FOUND']);
/**
 * Channel options. round_robin spreads new streams over a target's addresses, so the stream
 * opened after a drain reaches another replica; keepalive pings find a broker that vanished
 * without closing the connection (a dead host, a NAT drop) on a stream that is quiet.
 */
const CHANNEL_OPTIONS = {
  'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
  'grpc.keepalive_time_ms': 20_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.keepalive_permit_without_calls': 1,
  // gRPC's own reconnect backoff (1 s growing to 120 s by default) would otherwise outlast ours
  // and keep a worker away from a broker that is back.
  'grpc.initial_reconnect_backoff_ms': RECONNECT_INITIAL_MS,
  'grpc.max_reconnect_backoff_ms': RECONNECT_MAX_MS,
  'grpc.max_receive_message_length': -1,
  'grpc.primary_user_agent': 'taskbroker-node',
};

/** Exponential backoff with equal jitter; the first delay after a reset is 0. */
class Backoff {
  failures = 0;

  /** @returns {number} milliseconds to wait before the next attempt */
  next() {
    const failures = this.failures;
    this.failures += 1;
    if (failures === 0) return 0;
    const cap = Math.min(RECONNECT_MAX_MS, RECONNECT_INITIAL_MS * 2 ** (failures - 1));
    return Math.round(cap / 2 + (Math.random() * cap) / 2);
  }

  reset() {
    this.failures = 0;
  }
}

/**
 * Why a call failed, in a few words.
 *
 * @param {any} error a grpc-js ServiceError or any Error
 * @returns {string} the description
 */
function describe(error) {
  if (error && typeof error.code === 'number' && grpc.status[error.code]) {
    return `${grpc.status[error.code]}: ${error.details ?? error.message}`;
  }
  return error instanceof Error ? error.message : String(error);
}

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
      ...(options.connection
        ? connection(options.target, options.connection)
        : {
            credentials: options.credentials ?? grpc.credentials.createInsecure(),
            clientOptions: options.clientOptions ?? {},
          }),
      logger: options.logger ?? console,
      codec: options.codec,
    };
    /** Tasks finished with (any outcome). */
    this.processed = 0;
    /** Settlements the broker refused because the lease was no longer current. */
    this.staleSettlements = 0;
    /** Leases moved to a new stream (after a reconnect or a drain) with `open.resume`. */
    this.resumedLeases = 0;
    /** Leases found no longer this worker's (on resume or extension): handlers aborted. */
    this.lostLeases = 0;
    /** Streams opened after the first one (reconnects and moves after a drain). */
    this.reconnects = 0;
    /** @type {Session | null} */
    this.session = null;
  }

  /**
   * Runs handlers until `shutdown()` (or SIGTERM/SIGINT, when `handleSignals`) stops the
   * worker, keeping a Lease stream open: it reconnects when the stream breaks and moves to a
   * new one when the broker drains it, taking the leases of running handlers along.
   *
   * @param {object} [options]
   * @param {boolean} [options.handleSignals] SIGTERM/SIGINT shut the worker down gracefully
   *   (a second signal skips the rest of the grace period); default true
   * @returns {Promise<void>} resolves once the worker has shut down; rejects with the grpc-js
   *   error when the broker refuses the stream for good (INVALID_ARGUMENT, UNIMPLEMENTED,
   *   UNAUTHENTICATED, PERMISSION_DENIED)
   */
  async run({ handleSignals = true } = {}) {
    if (this.session) throw new Error('the worker is already running');
    const session = new Session(this);
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
   * are nacked for a retry), the streams are half-closed. A no-op when not running.
   *
   * @returns {Promise<void>} resolves once the worker has stopped
   */
  async shutdown() {
    await this.session?.shutdown();
  }
}

/**
 * One running task: its context, the stream holding its lease, its lease-extension timer.
 *
 * @typedef {object} TaskRun
 * @property {any} delivery the `Delivery` message
 * @property {AbortController} controller aborts `ctx.signal`
 * @property {number} leaseMs the lease length in force for it
 * @property {LeaseStream} stream the stream the broker holds its lease for, as far as the
 *   worker knows: the one that delivered it, or the one it was resumed on
 * @property {'running' | 'settling' | 'dropped' | 'finished'} state running: the handler runs
 *   and the lease is extended; settling: its outcome (or, at shutdown, the nack that gives it
 *   up) is on the way; dropped: the lease is not the worker's any more (revoked, lost), nothing
 *   more is sent for it, and its slot frees when the handler returns
 * @property {number} expireMs when its lease expires (broker's clock, epoch ms)
 * @property {NodeJS.Timeout | undefined} timer the next extension, while one is scheduled
 * @property {boolean} extending an extension is waiting for its answer
 */

/** One `Worker.run()`: the streams it opens one after the other, and the tasks they deliver. */
class Session {
  /** @param {Worker} worker */
  constructor(worker) {
    this.worker = worker;
    this.options = worker.options;
    this.log = worker.options.logger;
    /** @type {any} a `BrokerService` client: one channel for every stream of this run */
    this.client = null;
    /** @type {Set<LeaseStream>} streams open, draining or closing */
    this.streams = new Set();
    /** @type {LeaseStream | null} the stream that asks for work, while one is open */
    this.active = null;
    /** @type {LeaseStream | null} a stream whose open is in progress */
    this.opening = null;
    this.leaseMs = this.options.leaseMs;
    /** @type {Map<string, TaskRun>} running tasks by lease id, whichever stream they came on */
    this.runs = new Map();
    /** @type {Array<() => void>} resolved when nothing runs */
    this.idleWaiters = [];
    /** @type {Array<() => void>} resolved at the next change the reconnect loop watches */
    this.changeWaiters = [];
    /** @type {Array<{resolve: () => void, reject: (e: Error) => void}>} waiting for a stream */
    this.streamWaiters = [];
    /** @type {Array<() => void>} resolved at close */
    this.closeWaiters = [];
    /** Streams opened so far. */
    this.opens = 0;
    this.stopping = false;
    this.closed = false;
    /** @type {Promise<void> | null} */
    this.stopped = null;
    /** @type {() => void} */
    this.hurry = () => {};
  }

  /** @returns {Promise<void>} see Worker.run */
  async run() {
    const { BrokerService } = taskbrokerV1();
    this.client = new BrokerService(this.options.target, this.options.credentials, {
      ...CHANNEL_OPTIONS,
      ...this.options.clientOptions,
    });
    try {
      await this.loop();
      if (this.stopped) await this.stopped;
    } catch (error) {
      this.close();
      for (const run of this.runs.values()) run.controller.abort(error);
      throw error;
    } finally {
      for (const stream of this.streams) stream.cancel();
      this.client.close();
    }
  }

  // --- the reconnect loop -------------------------------------------------------------------

  /**
   * Keeps one stream asking for work: opens it, waits until it ends or is drained, opens the
   * next. Returns once the worker is closed (or stopping with nothing left to settle).
   */
  async loop() {
    const backoff = new Backoff();
    while (!this.closed) {
      if (this.stopping && this.runs.size === 0) return;
      /** @type {LeaseStream} */
      let stream;
      try {
        stream = await this.openStream();
      } catch (error) {
        if (FATAL_OPEN_CODES.has(/** @type {any} */ (error)?.code)) throw error;
        if (this.closed) return;
        const delay = backoff.next();
        this.log.warn(`cannot open a lease stream (${describe(error)}); retrying in ${delay} ms`);
        await this.pause(delay);
        continue;
      }
      const openedAt = Date.now();
      this.activate(stream);
      const why = await this.watch(stream);
      if (this.active === stream) this.active = null;
      if (why === 'closed') {
        stream.halfClose(CLOSE_TIMEOUT_MS);
        return;
      }
      if (why === 'drained') {
        // The old stream stays open for what it still holds; the next one opens at once.
        stream.retiring = true;
        this.retireIdle();
        backoff.reset();
        continue;
      }
      if (Date.now() - openedAt >= STABLE_STREAM_MS) backoff.reset();
      const delay = backoff.next();
      const how = stream.error ? describe(stream.error) : 'ended by the broker';
      this.log.warn(`lease stream ${stream.streamId} ended (${how}); reconnecting in ${delay} ms`);
      await this.pause(delay);
    }
  }

  /**
   * Opens a stream, asking to resume the leases of the tasks still running or settling.
   *
   * @returns {Promise<LeaseStream>} the open stream; rejects as LeaseStream.open
   */
  async openStream() {
    const { queues, workerId, concurrency, leaseMs } = this.options;
    const stream = new LeaseStream(this.client, this);
    const held = [...this.runs.values()].filter((run) => run.state !== 'dropped');
    const credits = this.stopping ? 0 : Math.max(0, concurrency - this.runs.size);
    // Set before the open: deliveries may arrive in the same read as `opened`.
    stream.unusedCredits = credits;
    this.streams.add(stream);
    this.opening = stream;
    /** @type {any} */
    let opened;
    try {
      opened = await stream.open(
        {
          queues,
          worker_id: workerId,
          credits,
          lease_duration: toDuration(leaseMs),
          resume: held.map((run) => ({
            task_id: run.delivery.task.id,
            lease_id: run.delivery.lease_id,
          })),
        },
        OPEN_TIMEOUT_MS,
      );
    } catch (error) {
      this.streams.delete(stream);
      throw error;
    } finally {
      this.opening = null;
    }
    this.opens += 1;
    if (this.opens > 1) this.worker.reconnects += 1;
    this.leaseMs = toMillis(opened.lease_duration) ?? this.leaseMs;
    const resumed = held.length > 0 ? `; resuming ${held.length} leases` : '';
    this.log.info(
      `lease stream ${stream.streamId} open on ${queues.join(',')} (credits ${credits})${resumed}`,
    );
    this.resumed(stream, held, opened.resumed);
    return stream;
  }

  /**
   * Applies the broker's answers to `open.resume`, one per lease, in order.
   *
   * @param {LeaseStream} stream the new stream
   * @param {TaskRun[]} held the tasks whose leases were listed
   * @param {any[]} results the `SettleResult`s (kind RESUME); none from a broker that does not
   *   resume leases
   */
  resumed(stream, held, results) {
    let moved = 0;
    held.forEach((run, i) => {
      const result = results[i];
      if (run.state === 'dropped' || run.state === 'finished') return; // while the open ran
      if (result?.outcome === 'SETTLE_OUTCOME_OK') {
        moved += 1;
        run.stream = stream;
        this.worker.resumedLeases += 1;
        if (run.state === 'running') {
          this.scheduleExtend(run, toMillis(result.lease_expire_time) ?? Date.now());
        }
      } else if (LOST_OUTCOMES.has(result?.outcome)) {
        // A settling task's outcome is sent again anyway: its answer tells what happened.
        if (run.state === 'running') this.lose(run, result.message);
      } else if (result) {
        // UNAVAILABLE or INVALID_ARGUMENT: keep the handler and settle it as usual.
        const { id } = run.delivery.task;
        this.log.warn(`task ${id}: lease not resumed (${result.outcome} ${result.message})`);
      }
    });
    if (held.length > 0 && results.length === 0) {
      this.log.warn(
        `lease stream ${stream.streamId}: the broker does not resume leases; ` +
          `${held.length} tasks will be settled as usual`,
      );
    } else if (held.length > 0) {
      this.log.info(`lease stream ${stream.streamId}: resumed ${moved} of ${held.length} leases`);
    }
    this.retireIdle();
  }

  /**
   * Makes a freshly opened stream the one that asks for work.
   *
   * @param {LeaseStream} stream the stream
   */
  activate(stream) {
    this.active = stream;
    for (const { resolve } of this.streamWaiters.splice(0)) resolve();
    this.topUp(); // tasks that finished while it was opening freed slots
    // Extensions that fell due while no stream was open.
    for (const run of this.runs.values()) {
      if (run.state === 'running' && run.timer === undefined && !run.extending) {
        void this.extend(run);
      }
    }
  }

  /**
   * Waits until the stream ends, is drained while the worker still needs a stream, or the
   * worker is closed.
   *
   * @param {LeaseStream} stream the active stream
   * @returns {Promise<'ended' | 'drained' | 'closed'>} which
   */
  async watch(stream) {
    for (;;) {
      if (this.closed) return 'closed';
      if (stream.ended) return 'ended';
      if (stream.draining && (!this.stopping || this.runs.size > 0)) return 'drained';
      await new Promise((resolve) => this.changeWaiters.push(() => resolve(undefined)));
    }
  }

  /** Wakes the reconnect loop to look again. */
  changed() {
    for (const wake of this.changeWaiters.splice(0)) wake();
  }

  /**
   * Sleeps, unless the worker is closed meanwhile.
   *
   * @param {number} ms how long
   * @returns {Promise<void>} resolves after `ms` or at close
   */
  pause(ms) {
    if (ms <= 0 || this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        const i = this.closeWaiters.indexOf(done);
        if (i >= 0) this.closeWaiters.splice(i, 1);
        resolve(undefined);
      };
      const timer = setTimeout(done, ms);
      this.closeWaiters.push(done);
    });
  }

  /**
   * Half-closes the retiring streams that nothing depends on any more: no lease of a running
   * or settling task, no unanswered settlement.
   */
  retireIdle() {
    for (const stream of this.streams) {
      if (!stream.retiring || !stream.usable || stream.unanswered > 0) continue;
      const holds = [...this.runs.values()].some(
        (run) => run.stream === stream && (run.state === 'running' || run.state === 'settling'),
      );
      if (!holds) stream.halfClose(CLOSE_TIMEOUT_MS);
    }
  }

  // --- what the streams report (StreamListener) ---------------------------------------------

  /**
   * @param {LeaseStream} stream the stream
   * @param {any[]} deliveries `Delivery` messages
   */
  onDeliveries(stream, deliveries) {
    // On a half-closed stream the broker returns them to the queue when the stream ends.
    if (stream.halfClosed) return;
    for (const delivery of deliveries) this.start(stream, delivery);
  }

  /**
   * @param {LeaseStream} _stream the stream
   * @param {any[]} leases `RevokedLease` messages
   */
  onRevoked(_stream, leases) {
    for (const lease of leases) this.revoke(lease);
  }

  /** @param {LeaseStream} stream the stream */
  onDrain(stream) {
    const id = stream.streamId;
    this.log.info(`lease stream ${id}: the broker is draining; moving to a new stream`);
    this.changed();
  }

  /** @param {LeaseStream} _stream the stream */
  onSettled(_stream) {
    this.retireIdle();
  }

  /**
   * A stream has ended. Its tasks' handlers keep running: the next stream resumes their
   * leases, and their unanswered settlements are sent again there.
   *
   * @param {LeaseStream} stream the stream
   */
  onEnd(stream) {
    this.streams.delete(stream);
    if (stream.retiring || stream.halfClosed) {
      this.log.info(`lease stream ${stream.streamId} closed`);
    }
    this.changed();
  }

  /** Grants credits for the slots that are free, unless the worker is winding down. */
  topUp() {
    const stream = this.active;
    if (!stream?.usable || stream.draining || this.stopping) return;
    const n = this.options.concurrency - this.runs.size - stream.unusedCredits;
    if (n > 0 && stream.send({ credit: { credits: n } })) stream.unusedCredits += n;
  }

  // --- running tasks ------------------------------------------------------------------------

  /**
   * @param {LeaseStream} stream the stream that delivered it
   * @param {any} delivery a `Delivery`
   */
  start(stream, delivery) {
    const { task, lease_id: leaseId } = delivery;
    /** @type {TaskRun} */
    const run = {
      delivery,
      controller: new AbortController(),
      leaseMs: toMillis(task.lease_duration) ?? this.leaseMs,
      stream,
      state: 'running',
      expireMs: toMillis(delivery.lease_expire_time) ?? Date.now(),
      timer: undefined,
      extending: false,
    };
    this.runs.set(leaseId, run);
    this.scheduleExtend(run, run.expireMs);
    void this.execute(run);
  }

  /**
   * Runs a task's handler and settles its outcome.
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
      parentIds: task.parent_ids,
      parentResults: task.parent_results.map((/** @type {any} */ parent) => ({
        taskId: parent.task_id,
        state: parent.state,
        result: parent.result,
        resultOmitted: parent.result_omitted,
      })),
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
    run.timer = undefined;
    if (run.state !== 'running') {
      this.finish(run); // revoked, lost, or given up at shutdown: nothing to settle
      return;
    }
    run.state = 'settling';
    try {
      let result = await this.settle(run, kind, { ...ids, ...frame });
      if (kind === 'ack' && result.outcome === 'SETTLE_OUTCOME_INVALID_ARGUMENT') {
        // For example a result over the payload limit: fail the attempt rather than hold it.
        kind = 'nack';
        error = `ack refused: ${result.message}`;
        result = await this.settle(run, kind, { ...ids, error });
      }
      this.report(run, kind, result, error);
    } catch (failure) {
      const why = failure instanceof Error ? failure.message : String(failure);
      this.log.warn(`task ${task.id}: ${kind} not sent (${why}); it will be redelivered`);
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
      const repeat = result.already_settled ? ' (a repeat: already settled)' : '';
      this.log.info(`task ${id} (${type}) attempt ${attempt}: ${kind}${detail}${repeat}`);
    } else if (LOST_OUTCOMES.has(result.outcome)) {
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
    run.state = 'finished';
    clearTimeout(run.timer);
    run.timer = undefined;
    if (!this.runs.delete(run.delivery.lease_id)) return;
    this.worker.processed += 1;
    this.topUp();
    this.retireIdle();
    if (this.runs.size === 0) for (const wake of this.idleWaiters.splice(0)) wake();
    this.changed();
  }

  /** @returns {Promise<void>} resolves once no task runs */
  whenIdle() {
    if (this.runs.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Stops a task whose lease is not this worker's any more; its outcome will not be sent.
   *
   * @param {TaskRun} run the task
   * @param {Error} reason given to `ctx.signal`
   */
  drop(run, reason) {
    run.state = 'dropped'; // its slot stays taken until the handler returns
    clearTimeout(run.timer);
    run.timer = undefined;
    run.controller.abort(reason);
    this.retireIdle();
  }

  /** @param {any} lease a `RevokedLease` */
  revoke(lease) {
    const run = this.runs.get(lease.lease_id);
    if (!run || run.state !== 'running') return;
    this.log.info(`task ${lease.task_id}: lease revoked (${lease.reason}); not settling it`);
    this.drop(run, new Error(`lease revoked: ${lease.reason || 'revoked'}`));
  }

  /**
   * @param {TaskRun} run a running task the broker no longer holds for this worker
   * @param {string} message the broker's detail
   */
  lose(run, message) {
    this.worker.lostLeases += 1;
    const why = message || 'no longer current';
    this.log.warn(`task ${run.delivery.task.id}: lease lost (${why}); stopping its handler`);
    this.drop(run, new Error('lease lost'));
  }

  // --- leases -------------------------------------------------------------------------------

  /**
   * Extends a task's lease when half of what is left of it has passed. The expiry is on the
   * broker's clock: clamping to the lease length bounds the effect of clock skew.
   *
   * @param {TaskRun} run the task
   * @param {number} expireMs when its lease expires (epoch ms)
   * @param {number} [floorMs] the shortest wait
   */
  scheduleExtend(run, expireMs, floorMs = 5) {
    run.expireMs = expireMs;
    clearTimeout(run.timer);
    const remaining = Math.min(Math.max(expireMs - Date.now(), 0), run.leaseMs);
    run.timer = setTimeout(
      () => {
        run.timer = undefined;
        void this.extend(run);
      },
      Math.max(remaining / 2, floorMs),
    );
  }

  /**
   * Extends a running task's lease, on the stream holding it or the current one. With no
   * stream open it waits: the next stream's resume (or `activate`) extends it.
   *
   * @param {TaskRun} run the task whose lease to extend
   */
  async extend(run) {
    if (run.state !== 'running' || run.extending) return;
    const stream = [run.stream, this.active].find((s) => s?.usable);
    if (!stream) return;
    const { task, lease_id: leaseId } = run.delivery;
    run.extending = true;
    let result;
    try {
      result = await stream.settle('extend', { task_id: task.id, lease_id: leaseId });
    } catch {
      return; // the stream ended: the next one resumes the lease, and extends it
    } finally {
      run.extending = false;
    }
    if (run.state !== 'running') return;
    if (result.outcome === 'SETTLE_OUTCOME_OK') {
      this.scheduleExtend(run, toMillis(result.lease_expire_time) ?? Date.now());
    } else if (LOST_OUTCOMES.has(result.outcome)) {
      this.lose(run, result.message);
    } else {
      this.log.error(`task ${task.id}: extension failed: ${result.outcome} ${result.message}`);
      this.scheduleExtend(run, run.expireMs, SETTLE_RETRY_MS); // again, before it runs out
    }
  }

  // --- settlements --------------------------------------------------------------------------

  /**
   * Sends an ack or nack until answered: on the stream holding the lease while it is open,
   * else on the current one (the broker accepts settlements on any stream), waiting for one
   * to open. UNAVAILABLE, "outcome unknown", is retried a few times.
   *
   * @param {TaskRun} run the task
   * @param {'ack' | 'nack'} kind the frame
   * @param {{lease_id: string, [field: string]: unknown}} frame its message
   * @returns {Promise<any>} the `SettleResult`; rejects when the worker stops first
   */
  async settle(run, kind, frame) {
    for (let unavailable = 0; ; ) {
      const stream = await this.streamFor(run);
      let result;
      try {
        result = await stream.settle(kind, frame);
      } catch (error) {
        if (error instanceof StreamLost) continue; // sent again on the next stream
        throw error;
      }
      if (result.outcome !== 'SETTLE_OUTCOME_UNAVAILABLE' || unavailable >= SETTLE_RETRIES) {
        return result;
      }
      unavailable += 1;
      await sleep(SETTLE_RETRY_MS * unavailable);
    }
  }

  /**
   * @param {TaskRun} run the task to settle
   * @returns {Promise<LeaseStream>} a stream to settle it on; rejects once the worker is closed
   */
  async streamFor(run) {
    for (;;) {
      if (this.closed) throw new Error('the worker has stopped');
      const stream = [run.stream, this.active].find((s) => s?.usable);
      if (stream) return stream;
      await new Promise((resolve, reject) => {
        this.streamWaiters.push({ resolve: () => resolve(undefined), reject });
      });
    }
  }

  // --- closing ------------------------------------------------------------------------------

  /** No more streams: waiters for one give up, the reconnect loop ends. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.opening?.cancel();
    const stopped = new Error('the worker has stopped');
    for (const { reject } of this.streamWaiters.splice(0)) reject(stopped);
    for (const wake of this.closeWaiters.splice(0)) wake();
    this.changed();
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
    this.changed();
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
    const unfinished = [...this.runs.values()].filter((run) => run.state === 'running');
    if (unfinished.length > 0) {
      this.log.warn(`shutting down: nacking ${unfinished.length} unfinished tasks`);
      const nacks = unfinished.map((run) => this.giveUp(run));
      await Promise.race([
        Promise.allSettled(nacks),
        sleep(ABORT_SETTLE_MS, undefined, { ref: false }),
      ]);
    }
    this.close();
    const streams = [...this.streams];
    for (const stream of streams) stream.halfClose(CLOSE_TIMEOUT_MS);
    await Promise.all(streams.map((stream) => stream.endedPromise));
  }

  /**
   * Stops waiting for a task's handler and nacks it, to be retried.
   *
   * @param {TaskRun} run the task
   */
  async giveUp(run) {
    const { task, lease_id: leaseId } = run.delivery;
    run.state = 'settling';
    clearTimeout(run.timer);
    run.timer = undefined;
    run.controller.abort(new Error('worker shut down'));
    try {
      const error = 'worker shut down before the task finished';
      const frame = { task_id: task.id, lease_id: leaseId, error };
      this.report(run, 'nack', await this.settle(run, 'nack', frame), error);
    } catch (failure) {
      const why = failure instanceof Error ? failure.message : String(failure);
      this.log.warn(`task ${task.id}: nack not sent (${why}); it will be redelivered`);
    } finally {
      this.finish(run);
    }
  }
}
