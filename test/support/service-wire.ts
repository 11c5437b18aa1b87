/**
 * The probe guest's service protocol (test/guest/probe.c, README "Service"): little-endian, fixed
 * sizes. Shared by the witness-side client (service-client-child.ts) and its tests.
 */

/** The guest sends its counter datagrams to this UDP port of the peer (the witness). */
export const SERVICE_UDP_PORT = 7001;
/** The guest's TCP service port, on its service address. */
export const SERVICE_TCP_PORT = 7002;

export const DATAGRAM_SIZE = 40;
export const REQUEST_SIZE = 16;
export const RESPONSE_SIZE = 40;
const VERSION = 1;
const DATAGRAM_MAGIC = Buffer.from('FTVS');
const REQUEST_MAGIC = Buffer.from('FTVQ');
const RESPONSE_MAGIC = Buffer.from('FTVR');

/** One counter datagram: sent every ms by the guest. */
export interface CounterDatagram {
  bootId: bigint;
  /** 1, 2, 3, … per boot: a value in guest RAM, so a restored checkpoint rolls it back too. */
  seq: bigint;
  /** The probe's workload counter (what the failover tests call the counter). */
  counter: bigint;
  /** Guest CLOCK_REALTIME ns when it was sent. */
  guestRealtimeNs: bigint;
}

export interface CounterResponse {
  requestId: bigint;
  counter: bigint;
  bootId: bigint;
  guestRealtimeNs: bigint;
}

/** Undefined for anything that is not a well-formed datagram of this version. */
export function decodeDatagram(buf: Buffer): CounterDatagram | undefined {
  if (buf.length !== DATAGRAM_SIZE || !buf.subarray(0, 4).equals(DATAGRAM_MAGIC) || buf[4] !== VERSION || buf[5] !== 1) return undefined;
  return { bootId: buf.readBigUInt64LE(8), seq: buf.readBigUInt64LE(16), counter: buf.readBigUInt64LE(24), guestRealtimeNs: buf.readBigUInt64LE(32) };
}

export function encodeDatagram(d: CounterDatagram): Buffer {
  const buf = Buffer.alloc(DATAGRAM_SIZE);
  DATAGRAM_MAGIC.copy(buf, 0);
  buf[4] = VERSION;
  buf[5] = 1;
  buf.writeBigUInt64LE(d.bootId, 8);
  buf.writeBigUInt64LE(d.seq, 16);
  buf.writeBigUInt64LE(d.counter, 24);
  buf.writeBigUInt64LE(d.guestRealtimeNs, 32);
  return buf;
}

export function encodeRequest(requestId: bigint): Buffer {
  const buf = Buffer.alloc(REQUEST_SIZE);
  REQUEST_MAGIC.copy(buf, 0);
  buf[4] = VERSION;
  buf.writeBigUInt64LE(requestId, 8);
  return buf;
}

/** Undefined for a malformed request (the guest then closes the connection). */
export function decodeRequest(buf: Buffer): bigint | undefined {
  if (buf.length !== REQUEST_SIZE || !buf.subarray(0, 4).equals(REQUEST_MAGIC) || buf[4] !== VERSION) return undefined;
  return buf.readBigUInt64LE(8);
}

export function encodeResponse(r: CounterResponse): Buffer {
  const buf = Buffer.alloc(RESPONSE_SIZE);
  RESPONSE_MAGIC.copy(buf, 0);
  buf[4] = VERSION;
  buf.writeBigUInt64LE(r.requestId, 8);
  buf.writeBigUInt64LE(r.counter, 16);
  buf.writeBigUInt64LE(r.bootId, 24);
  buf.writeBigUInt64LE(r.guestRealtimeNs, 32);
  return buf;
}

export function decodeResponse(buf: Buffer): CounterResponse | undefined {
  if (buf.length !== RESPONSE_SIZE || !buf.subarray(0, 4).equals(RESPONSE_MAGIC) || buf[4] !== VERSION) return undefined;
  return { requestId: buf.readBigUInt64LE(8), counter: buf.readBigUInt64LE(16), bootId: buf.readBigUInt64LE(24), guestRealtimeNs: buf.readBigUInt64LE(32) };
}
