/**
 * LeaseStream: one `Lease` call. It sends `open` (with the leases to resume), matches settle
 * results to the frames that asked for them, and hands deliveries, revocations and the drain
 * notice to its listener. It knows nothing of handlers or reconnecting: that is the Worker's job.
 *
 * @module
 */

import * as grpc from '@grpc/grpc-js';

/** Which SettleResult.kind answers which frame. */
const SETTLE_KINDS = {
  ack: 'SETTLE_KIND_ACK',
  nack: 'SETTLE_KIND_NACK',
  extend: 'SETTLE_KIND_EXTEND',
};

/** A settlement's stream ended before it was answered: send it again on another stream. */
export class StreamLost extends Error {
  name = 'StreamLost';
}

/**
 * What a stream tells the worker about.
 *
 * @typedef {object} StreamListener
 * @property {(stream: LeaseStream, deliveries: any[]) => void} onDeliveries tasks leased to it
 * @property {(stream: LeaseStream, leases: any[]) => void} onRevoked leases no longer valid
 * @property {(stream: LeaseStream) => void} onDrain the broker is shutting down
 * @property {(stream: LeaseStream) => void} onSettled a settlement was answered
 * @property {(stream: LeaseStream) => void} onEnd the call has ended
 */

/**
 * A grpc-js status as an Error carrying its `code`, like the `ServiceError`s grpc-js emits.
 *
 * @param {{code: number, details: string}} status the call's status
 * @returns {Error & {code: number}} the error
 */
function statusError(status) {
  const name = grpc.status[status.code] ?? status.code;
  return Object.assign(new Error(`${name}: ${status.details}`), { code: status.code });
}

/** One Lease call, from `open` to its status. */
export class LeaseStream {
  /**
   * @param {any} client a `BrokerService` client
   * @param {StreamListener} listener told about frames and the end
   */
  constructor(client, listener) {
    this.client = client;
    this.listener = listener;
    /** @type {any} grpc-js ClientDuplexStream */
    this.call = null;
    this.streamId = '';
    /** Credits granted and not yet used by a delivery. */
    this.unusedCredits = 0;
    /** The broker sent `drain`: no more deliveries here. */
    this.draining = false;
    /** The worker has moved on: half-close once nothing depends on this stream. */
    this.retiring = false;
    this.halfClosed = false;
    this.ended = false;
    /** @type {Error | null} why the call ended, when not cleanly */
    this.error = null;
    /** @type {Map<string, Array<{resolve: (r: any) => void, reject: (e: Error) => void}>>} */
    this.pending = new Map();
    /** @type {() => void} */
    this.markEnded = () => {};
    /** Resolves when the call has ended. */
    this.endedPromise = new Promise((resolve) => {
      this.markEnded = () => resolve(undefined);
    });
  }

  /** Open, and neither half-closed nor ended: frames can still be written. */
  get usable() {
    return Boolean(this.streamId) && !this.halfClosed && !this.ended;
  }

  /** Settlements sent on this stream and not answered yet. */
  get unanswered() {
    let n = 0;
    for (const waiting of this.pending.values()) n += waiting.length;
    return n;
  }

  /**
   * Starts the call, sends `open` and waits for `opened`; from then on frames go to the
   * listener.
   *
   * @param {object} open the `LeaseOpen` message
   * @param {number} timeoutMs how long to wait for `opened`
   * @returns {Promise<any>} the `LeaseOpened` message; rejects with an Error carrying the
   *   grpc `code` when the broker refused the call, or when no answer came in time
   */
  async open(open, timeoutMs) {
    const call = this.client.Lease();
    this.call = call;
    call.on('error', (/** @type {Error} */ error) => {
      this.error ??= error; // the status event below ends the stream
    });
    /** @type {Promise<any>} */
    const opened = new Promise((resolve, reject) => {
      // One listener from the start, handling `opened` synchronously: the frames after it may
      // arrive in the same read.
      call.on('data', (/** @type {any} */ response) => {
        if (this.streamId) {
          this.dispatch(response);
        } else if (response.frame === 'opened') {
          this.streamId = response.opened.stream_id || '?';
          resolve(response.opened);
        } else {
          reject(new Error(`expected opened, got ${response.frame}`));
        }
      });
      call.on('status', (/** @type {{code: number, details: string}} */ status) => {
        if (status.code !== grpc.status.OK && !this.halfClosed) {
          this.error ??= statusError(status);
        }
        reject(this.error ?? new Error('the broker ended the stream unopened'));
        this.end();
      });
      const timer = setTimeout(() => {
        const late = new Error('no answer to open in time');
        reject(Object.assign(late, { code: grpc.status.DEADLINE_EXCEEDED }));
      }, timeoutMs);
      timer.unref();
    });
    call.write({ open });
    try {
      return await opened;
    } catch (error) {
      call.cancel();
      throw error;
    }
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
        this.listener.onDeliveries(this, response.deliveries.deliveries);
        break;
      case 'settle_results':
        for (const result of response.settle_results.results) this.resolve(result);
        this.listener.onSettled(this);
        break;
      case 'revoked':
        this.listener.onRevoked(this, response.revoked.leases);
        break;
      case 'drain':
        this.draining = true;
        this.unusedCredits = 0;
        this.listener.onDrain(this);
        break;
      default:
        // A frame added to the protocol after this client was written: nothing to do with it.
        break;
    }
  }

  /**
   * Writes a frame unless the stream is closed for writing.
   *
   * @param {object} request a `LeaseRequest`
   * @returns {boolean} whether it was written
   */
  send(request) {
    if (!this.usable) return false;
    this.call.write(request);
    return true;
  }

  /**
   * Sends an ack, nack or extend frame and waits for its SettleResult (answers are matched by
   * lease id and kind, since they come in the order applied, not sent).
   *
   * @param {'ack' | 'nack' | 'extend'} kind the frame
   * @param {{lease_id: string, [field: string]: unknown}} frame its message
   * @returns {Promise<any>} the `SettleResult`; rejects with StreamLost when the stream is
   *   closed or ends before the answer
   */
  settle(kind, frame) {
    return new Promise((resolve, reject) => {
      if (!this.send({ [kind]: frame })) {
        reject(new StreamLost(`lease stream ${this.streamId} is closed`));
        return;
      }
      const key = `${frame.lease_id}/${SETTLE_KINDS[kind]}`;
      const waiting = this.pending.get(key) ?? [];
      waiting.push({ resolve, reject });
      this.pending.set(key, waiting);
    });
  }

  /** @param {any} result a `SettleResult` */
  resolve(result) {
    const key = `${result.lease_id}/${result.kind}`;
    const waiting = this.pending.get(key);
    const next = waiting?.shift();
    if (waiting?.length === 0) this.pending.delete(key);
    next?.resolve(result);
  }

  /**
   * Tells the broker nothing more will be sent; it answers what it got, then ends the stream.
   *
   * @param {number} timeoutMs after this long, the call is cancelled
   */
  halfClose(timeoutMs) {
    if (this.halfClosed || this.ended || !this.call) return;
    this.halfClosed = true;
    this.call.end();
    setTimeout(() => this.cancel(), timeoutMs).unref();
  }

  /** Drops the call at once (the broker sees it cancelled). */
  cancel() {
    if (!this.ended) this.call?.cancel();
  }

  /** The call has ended: unanswered settlements fail with StreamLost. */
  end() {
    if (this.ended) return;
    this.ended = true;
    const lost = new StreamLost(`lease stream ${this.streamId || '(unopened)'} ended`);
    for (const waiting of this.pending.values()) for (const { reject } of waiting) reject(lost);
    this.pending.clear();
    this.markEnded();
    if (this.streamId) this.listener.onEnd(this);
  }
}
