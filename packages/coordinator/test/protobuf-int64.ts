/**
 * Test-environment repair: vitest runs Node with `--conditions import` (from the `resolve.conditions`
 * in vitest.config.ts), so when protobufjs (under etcd3's gRPC) does `require("long")` it gets
 * long's ES module, finds no `isLong`, and falls back to decoding int64 fields as doubles: etcd's
 * 64-bit lease ids come out rounded ("8490870992369754030" → "8490870992369754000") and every
 * claim fails with "lease not found". Plain node and tsx (how the agent runs) are not affected.
 * Importing this module gives protobufjs its Long class and re-configures its readers; it does
 * nothing where protobufjs already has it.
 */
import { createRequire } from 'node:module';

const fromHere = createRequire(import.meta.url);
const fromLoader = createRequire(createRequire(fromHere.resolve('etcd3')).resolve('@grpc/proto-loader'));
const protobufPath = fromLoader.resolve('protobufjs');
const protobuf = fromLoader('protobufjs') as { util: { Long: unknown }; configure(): void };
if (!protobuf.util.Long) {
  const long = createRequire(protobufPath)('long') as { isLong?: unknown; default?: unknown };
  protobuf.util.Long = long.isLong ? long : long.default;
  protobuf.configure();
}

/** True when 64-bit integers survive decoding (for an assertion in the tests that need it). */
export function int64Exact(): boolean {
  const pb = fromLoader('protobufjs') as { Writer: { create(): { int64(v: string): void; finish(): Uint8Array } }; Reader: { create(b: Uint8Array): { int64(): { toString(): string } } } };
  const writer = pb.Writer.create();
  writer.int64('8490870992369754031');
  return pb.Reader.create(writer.finish()).int64().toString() === '8490870992369754031';
}
