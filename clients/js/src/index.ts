// tern-client: the Tern protocol (docs/PROTOCOL.md) over WebSocket, for
// browsers and Node. No dependencies, ES modules, usable without a bundler.

export * from "./codec.js";
export * from "./state.js";
export * from "./client.js";
