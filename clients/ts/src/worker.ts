/**
 * A worker on the generated client, as small as the Lease protocol allows
 * (docs/writing-a-worker.md): one stream, `concurrency` credits, every delivery of type `greet`
 * acked with "hello <payload>", any other type dead-lettered, one credit granted back per
 * settled task. SIGTERM/SIGINT half-close the stream; the broker then ends it.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";

import type { Delivery, LeaseRequestSchema } from "./gen/taskbroker/v1/lease_pb.js";
import { brokerClient, QUEUE } from "./transport.js";

type Frame = MessageInitShape<typeof LeaseRequestSchema>;

/** The request side of the stream: frames pushed here are sent in order until close(). */
class Outbox implements AsyncIterable<Frame> {
  private frames: Frame[] = [];
  private closed = false;
  private wake: (() => void) | null = null;

  push(frame: Frame): void {
    this.frames.push(frame);
    this.wake?.();
  }

  close(): void {
    this.closed = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Frame> {
    for (;;) {
      const frame = this.frames.shift();
      if (frame) {
        yield frame;
      } else if (this.closed) {
        return;
      } else {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = null;
      }
    }
  }
}

const concurrency = 4;
const decoder = new TextDecoder();
const encoder = new TextEncoder();
const outbox = new Outbox();
for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => outbox.close());

/** The settlement of one delivery: its result, or a dead letter for an unknown type. */
function settle({ task, leaseId }: Delivery): Frame {
  const taskId = task?.id ?? "";
  if (task?.type !== "greet") {
    const error = `no handler for task type ${task?.type}`;
    return { frame: { case: "nack", value: { taskId, leaseId, error, deadLetter: true } } };
  }
  const result = encoder.encode(`hello ${decoder.decode(task.payload)}`);
  return { frame: { case: "ack", value: { taskId, leaseId, result } } };
}

outbox.push({
  frame: { case: "open", value: { queues: [QUEUE], workerId: `ts-${process.pid}`, credits: concurrency } },
});
let processed = 0;
for await (const response of brokerClient().lease(outbox)) {
  const { frame } = response;
  if (frame.case === "deliveries") {
    for (const delivery of frame.value.deliveries) {
      outbox.push(settle(delivery));
      processed += 1;
    }
    outbox.push({ frame: { case: "credit", value: { credits: frame.value.deliveries.length } } });
  } else if (frame.case === "drain") {
    outbox.close();
  }
}
console.log(`stream ended after ${processed} tasks`);
