// An application's worker, run from a directory that installed the npm tarball of clients/node.
// TASKBROKER_TARGET and TASKBROKER_QUEUE pick the broker and queue. Runs until SIGTERM/SIGINT.
import { Worker } from 'taskbroker-node';

const worker = new Worker({
  target: process.env.TASKBROKER_TARGET ?? 'localhost:50051',
  queues: [process.env.TASKBROKER_QUEUE ?? 'greetings'],
  handlers: { greet: async (payload) => `hello ${payload.toString('utf8')}` },
  concurrency: 4,
});
await worker.run();
