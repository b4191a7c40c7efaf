/**
 * The generated BrokerService client over gRPC (HTTP/2, plaintext) from @connectrpc/connect-node.
 * TASKBROKER_TARGET (`host:port`, default localhost:50051) names the broker.
 */
import { type Client, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BrokerService } from "./gen/taskbroker/v1/broker_service_pb.js";

export const TARGET = process.env.TASKBROKER_TARGET ?? "localhost:50051";
export const QUEUE = process.env.TASKBROKER_QUEUE ?? "greetings";

/** A BrokerService client for TARGET. */
export function brokerClient(): Client<typeof BrokerService> {
  return createClient(BrokerService, createGrpcTransport({ baseUrl: `http://${TARGET}` }));
}
