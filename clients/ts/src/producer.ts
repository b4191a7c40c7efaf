/**
 * A producer on the generated client: enqueues five `greet` tasks and polls GetTask until each
 * has succeeded with the worker's result; exits 1 otherwise.
 */
import { setTimeout as sleep } from "node:timers/promises";

import { TaskState } from "./gen/taskbroker/v1/task_pb.js";
import { brokerClient, QUEUE } from "./transport.js";

const FINISHED = new Set([TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED]);
const client = brokerClient();
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const deadline = Date.now() + 60_000;
const names = [0, 1, 2, 3, 4].map((i) => `user-${i}`);

const { results } = await client.enqueue({
  tasks: names.map((name) => ({ queue: QUEUE, type: "greet", payload: encoder.encode(name) })),
});
for (const [i, { taskId }] of results.entries()) {
  let task = (await client.getTask({ taskId })).task;
  while (task && !FINISHED.has(task.state) && Date.now() < deadline) {
    await sleep(50);
    task = (await client.getTask({ taskId })).task;
  }
  const result = task ? decoder.decode(task.result) : "";
  if (task?.state !== TaskState.SUCCEEDED || result !== `hello ${names[i]}`) {
    console.error(`task ${taskId}: ${task ? TaskState[task.state] : "missing"} ${result}`);
    process.exit(1);
  }
}
console.log(`${results.length} tasks succeeded`);
