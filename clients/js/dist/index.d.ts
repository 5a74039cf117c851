export * from "./codec.js";
export * from "./state.js";
export * from "./client.js";
