// An application's producer: enqueues five greet tasks and waits until they have succeeded;
// exits 1 when one did not succeed with the worker's result.
import { setTimeout as sleep } from 'node:timers/promises';

import { Producer } from 'taskbroker-node';

const FINISHED = new Set(['TASK_STATE_SUCCEEDED', 'TASK_STATE_DEAD', 'TASK_STATE_CANCELLED']);
const producer = new Producer(process.env.TASKBROKER_TARGET ?? 'localhost:50051');
const queue = process.env.TASKBROKER_QUEUE ?? 'greetings';
const names = [0, 1, 2, 3, 4].map((i) => `user-${i}`);
const deadline = Date.now() + 60_000;
for (const name of names) {
  const { taskId } = await producer.enqueue(queue, 'greet', name);
  let task = await producer.getTask(taskId);
  while (!FINISHED.has(task.state) && Date.now() < deadline) {
    await sleep(50);
    task = await producer.getTask(taskId);
  }
  if (task.state !== 'TASK_STATE_SUCCEEDED' || task.result.toString('utf8') !== `hello ${name}`) {
    console.error(`task ${taskId}: ${task.state} ${task.result.toString('utf8')}`);
    process.exit(1);
  }
}
producer.close();
console.log(`${names.length} tasks succeeded`);
