/**
 * The replication stream's messages (proto/duplex/v1/replication.proto): hand-written TS types and
 * encode/decode functions over protobufjs reflection (the .proto is loaded at runtime, so there is
 * no generated code to keep in step).
 *
 * This is the codec edge for bytes from another node: `decodeRequest`/`decodeResponse` never
 * throw. Garbage, unknown enum values, missing fields, payload lengths that do not match the data,
 * and uint64 values beyond 2^53 all come back as a typed `DecodeError`. Inside duplex every
 * number is then a safe integer; only `xxh64` stays a bigint. Encoding trusts its caller: a bad
 * value there is a programmer error (assert).
 */
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import protobuf from 'protobufjs'
import { assert, assertSafeUint, unreachable } from '../core/assert.js'
import { replicationCodes } from './replication-types.js'
import type { OpKind, ReplicationCode } from './replication-types.js'

/** The version this build speaks; a peer with another one is refused at Hello. */
export const protocolVersion = 1
/** Ops per OpBatch a receiver accepts (a sender batches at most this many). */
export const batchOpsMax = 4096
/** Acks per AckBatch a receiver accepts. */
export const batchAcksMax = 65536
/** Bytes of a Hello's volume/from_node and of any message string a receiver accepts. */
export const textBytesMax = 4096
/** Bytes of an incarnation a receiver accepts. */
export const incarnationBytesMax = 64

// ---------------------------------------------------------------------------------------------
// Types

export interface Hello {
  volume: string
  epoch: number
  fromNode: string
  /** Random per process start of the sender (distinguishes a restarted peer). */
  incarnation: Buffer
  protocolVersion: number
}

export interface HelloAck {
  incarnation: Buffer
  epoch: number
  /** Every seq <= appliedSeq of `epoch` is applied on the secondary. */
  appliedSeq: number
}

export type HelloRejectCode =
  | 'VOLUME_NOT_FOUND'
  | 'EPOCH_STALE'
  | 'EPOCH_AHEAD'
  | 'WRONG_SENDER'
  | 'PROTOCOL_VERSION'
  | 'NOT_SECONDARY'
  | 'SHUTTING_DOWN'

export interface HelloReject {
  code: HelloRejectCode
  message: string
  /** The receiver's epoch for the volume, 0 if none. */
  epoch: number
}

/** One replicated op as it travels. For trim/zero, `data` is empty and `xxh64` is 0n. */
export interface WireOp {
  epoch: number
  seq: number
  kind: OpKind
  offset: number
  length: number
  data: Buffer
  xxh64: bigint
  fua: boolean
  noHole: boolean
}

export interface EpochSeq {
  epoch: number
  seq: number
}

export interface EpochFlush {
  epoch: number
  flushId: number
}

export type GoodbyeReason = 'SHUTTING_DOWN' | 'PROTOCOL_ERROR' | 'RESET' | 'REPLACED'

export interface Goodbye {
  reason: GoodbyeReason
  message: string
}

export type ReplicateRequest =
  | { type: 'hello'; hello: Hello }
  | { type: 'ops'; ops: WireOp[] }
  | ({ type: 'flush' } & EpochFlush)
  | ({ type: 'goodbye' } & Goodbye)

export type ReplicateResponse =
  | { type: 'helloAck'; helloAck: HelloAck }
  | { type: 'helloReject'; helloReject: HelloReject }
  | { type: 'acks'; acks: EpochSeq[] }
  | ({ type: 'flushAck' } & EpochFlush)
  | ({ type: 'reject'; code: ReplicationCode; message: string } & EpochSeq)
  | ({ type: 'rejectFlush'; code: ReplicationCode; message: string } & EpochFlush)
  | ({ type: 'goodbye' } & Goodbye)

/**
 * Why bytes from a peer are not a valid message.
 * - MALFORMED: not protobuf, or no body set.
 * - MISSING_FIELD: a required field is absent (zero/empty).
 * - UNKNOWN_ENUM: an enum value this build does not know.
 * - LENGTH_MISMATCH: a write's `length` differs from its data, or a trim/zero carries data.
 * - UNSAFE_INTEGER: a uint64 beyond 2^53, or offset + length beyond it.
 * - TOO_LARGE: more ops, acks or text bytes than the named maxima allow.
 */
export type DecodeErrorCode =
  | 'MALFORMED'
  | 'MISSING_FIELD'
  | 'UNKNOWN_ENUM'
  | 'LENGTH_MISMATCH'
  | 'UNSAFE_INTEGER'
  | 'TOO_LARGE'

export class DecodeError extends Error {
  override name = 'DecodeError'
  constructor(
    readonly code: DecodeErrorCode,
    message: string,
  ) {
    super(message)
  }
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; error: DecodeError }

// ---------------------------------------------------------------------------------------------
// Schema

/** dist/src/replica/peer-messages.js -> proto/ at the repository (or package) root. */
export const replicationProtoPath = join(
  dirname(fileURLToPath(import.meta.url)),
  '../../../proto/duplex/v1/replication.proto',
)

const root = protobuf.loadSync(replicationProtoPath)
const RequestType = root.lookupType('duplex.v1.ReplicateRequest')
const ResponseType = root.lookupType('duplex.v1.ReplicateResponse')

const opKinds: readonly OpKind[] = ['write', 'trim', 'zero']

const helloRejectCodes: readonly HelloRejectCode[] = [
  'VOLUME_NOT_FOUND',
  'EPOCH_STALE',
  'EPOCH_AHEAD',
  'WRONG_SENDER',
  'PROTOCOL_VERSION',
  'NOT_SECONDARY',
  'SHUTTING_DOWN',
]
const goodbyeReasons: readonly GoodbyeReason[] = [
  'SHUTTING_DOWN',
  'PROTOCOL_ERROR',
  'RESET',
  'REPLACED',
]

/** Wire value of a string enum listed in `values` (UNSPECIFIED = 0 comes first on the wire). */
function enumToWire<T>(values: readonly T[], value: T): number {
  const index = values.indexOf(value)
  assert(index >= 0, `unknown enum value ${String(value)}`)
  return index + 1
}

// ---------------------------------------------------------------------------------------------
// Encode

function u64(value: number, what: string): number {
  assertSafeUint(value, what)
  return value
}

/** protobufjs writes 64-bit values from `{low, high}` and reads them as Long (same shape). */
interface LongBits {
  low: number
  high: number
}

function fixed64(value: bigint): LongBits {
  assert(value >= 0n && value < 1n << 64n, 'xxh64 must fit in 64 bits')
  return { low: Number(value & 0xffffffffn) | 0, high: Number(value >> 32n) | 0 }
}

function isLongBits(value: unknown): value is LongBits {
  if (typeof value !== 'object' || value === null) return false
  const { low, high } = value as Partial<LongBits>
  return typeof low === 'number' && typeof high === 'number'
}

function encodeOp(op: WireOp): Record<string, unknown> {
  assert(op.kind === 'write' ? op.data.length === op.length : op.data.length === 0, 'op data')
  assertSafeUint(op.offset + op.length, 'op end')
  return {
    epoch: u64(op.epoch, 'epoch'),
    seq: u64(op.seq, 'seq'),
    kind: enumToWire(opKinds, op.kind),
    offset: u64(op.offset, 'offset'),
    length: u64(op.length, 'length'),
    data: op.data,
    xxh64: fixed64(op.xxh64),
    fua: op.fua,
    noHole: op.noHole,
  }
}

function requestBody(request: ReplicateRequest): Record<string, unknown> {
  switch (request.type) {
    case 'hello': {
      const { hello } = request
      return {
        hello: {
          volume: hello.volume,
          epoch: u64(hello.epoch, 'epoch'),
          fromNode: hello.fromNode,
          incarnation: hello.incarnation,
          protocolVersion: hello.protocolVersion,
        },
      }
    }
    case 'ops':
      assert(request.ops.length <= batchOpsMax, 'batch exceeds batchOpsMax')
      return { ops: { ops: request.ops.map(encodeOp) } }
    case 'flush':
      return { flush: { epoch: u64(request.epoch, 'epoch'), flushId: u64(request.flushId, 'id') } }
    case 'goodbye':
      return { goodbye: encodeGoodbye(request) }
    default:
      return unreachable(request)
  }
}

function encodeGoodbye(goodbye: Goodbye): Record<string, unknown> {
  return { reason: enumToWire(goodbyeReasons, goodbye.reason), message: goodbye.message }
}

function responseBody(response: ReplicateResponse): Record<string, unknown> {
  switch (response.type) {
    case 'helloAck': {
      const ack = response.helloAck
      return {
        helloAck: {
          incarnation: ack.incarnation,
          epoch: u64(ack.epoch, 'epoch'),
          appliedSeq: u64(ack.appliedSeq, 'appliedSeq'),
        },
      }
    }
    case 'helloReject': {
      const reject = response.helloReject
      return {
        helloReject: {
          code: enumToWire(helloRejectCodes, reject.code),
          message: reject.message,
          epoch: u64(reject.epoch, 'epoch'),
        },
      }
    }
    case 'acks':
      assert(response.acks.length <= batchAcksMax, 'batch exceeds batchAcksMax')
      return {
        acks: {
          acks: response.acks.map((a) => ({ epoch: u64(a.epoch, 'e'), seq: u64(a.seq, 's') })),
        },
      }
    case 'flushAck':
      return { flushAck: { epoch: u64(response.epoch, 'e'), flushId: u64(response.flushId, 'id') } }
    case 'reject':
      return {
        reject: {
          epoch: u64(response.epoch, 'epoch'),
          seq: u64(response.seq, 'seq'),
          code: enumToWire(replicationCodes, response.code),
          message: response.message,
        },
      }
    case 'rejectFlush':
      return {
        rejectFlush: {
          epoch: u64(response.epoch, 'epoch'),
          flushId: u64(response.flushId, 'flushId'),
          code: enumToWire(replicationCodes, response.code),
          message: response.message,
        },
      }
    case 'goodbye':
      return { goodbye: encodeGoodbye(response) }
    default:
      return unreachable(response)
  }
}

export function encodeRequest(request: ReplicateRequest): Buffer {
  return toBuffer(RequestType.encode(requestBody(request)).finish())
}

export function encodeResponse(response: ReplicateResponse): Buffer {
  return toBuffer(ResponseType.encode(responseBody(response)).finish())
}

function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length)
}

// ---------------------------------------------------------------------------------------------
// Decode: each reader throws DecodeError; only decodeRequest/decodeResponse catch, at the edge.

/** A decoded protobufjs message, read field by field and validated. */
type Fields = Record<string, unknown>

function fail(code: DecodeErrorCode, message: string): never {
  throw new DecodeError(code, message)
}

function readMessage(parent: Fields, name: string): Fields {
  const value = parent[name]
  if (value === null || value === undefined || typeof value !== 'object') {
    return fail('MISSING_FIELD', `${name} missing`)
  }
  return value as Fields
}

/** A uint64 as a safe integer (protobufjs gives a Long, or a number without long support). */
function readU64(message: Fields, name: string): number {
  const value = message[name]
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) fail('UNSAFE_INTEGER', `${name} out of range`)
    return value
  }
  if (isLongBits(value)) {
    const high = value.high >>> 0
    if (high >= 0x200000) fail('UNSAFE_INTEGER', `${name} exceeds 2^53`)
    return high * 0x100000000 + (value.low >>> 0)
  }
  return fail('MALFORMED', `${name} is not an integer`)
}

function readPositive(message: Fields, name: string): number {
  const value = readU64(message, name)
  if (value === 0) fail('MISSING_FIELD', `${name} missing`)
  return value
}

function readFixed64(message: Fields, name: string): bigint {
  const value = message[name]
  if (typeof value === 'number') return BigInt(value)
  if (!isLongBits(value)) return fail('MALFORMED', `${name} is not an integer`)
  return (BigInt(value.high >>> 0) << 32n) | BigInt(value.low >>> 0)
}

function readBool(message: Fields, name: string): boolean {
  const value = message[name]
  if (typeof value !== 'boolean') fail('MALFORMED', `${name} is not a bool`)
  return value
}

const emptyBytes = Buffer.alloc(0)

function readBytes(message: Fields, name: string): Buffer {
  const value = message[name]
  // An absent bytes field reads as protobufjs's shared empty-array default.
  if (Array.isArray(value) && value.length === 0) return emptyBytes
  if (!(value instanceof Uint8Array)) return fail('MALFORMED', `${name} is not bytes`)
  return toBuffer(value)
}

function readText(message: Fields, name: string, required: boolean): string {
  const value = message[name]
  if (typeof value !== 'string') return fail('MALFORMED', `${name} is not a string`)
  if (required && value.length === 0) fail('MISSING_FIELD', `${name} missing`)
  if (Buffer.byteLength(value) > textBytesMax) fail('TOO_LARGE', `${name} exceeds textBytesMax`)
  return value
}

function readEnum<T>(message: Fields, name: string, values: readonly T[]): T {
  const value = message[name]
  if (typeof value !== 'number') return fail('MALFORMED', `${name} is not an enum`)
  if (value === 0) return fail('MISSING_FIELD', `${name} missing`)
  const known = values[value - 1]
  if (known === undefined) return fail('UNKNOWN_ENUM', `${name} ${value} unknown`)
  return known
}

function readList(message: Fields, name: string, max: number): Fields[] {
  const value = message[name]
  if (!Array.isArray(value)) return fail('MALFORMED', `${name} is not a list`)
  if (value.length > max) fail('TOO_LARGE', `${value.length} ${name}, more than ${max}`)
  return value as Fields[]
}

function readHello(message: Fields): Hello {
  const incarnation = readBytes(message, 'incarnation')
  if (incarnation.length === 0) fail('MISSING_FIELD', 'incarnation missing')
  if (incarnation.length > incarnationBytesMax) fail('TOO_LARGE', 'incarnation too long')
  return {
    volume: readText(message, 'volume', true),
    epoch: readU64(message, 'epoch'),
    fromNode: readText(message, 'fromNode', true),
    incarnation,
    protocolVersion: readPositive(message, 'protocolVersion'),
  }
}

function readOp(message: Fields): WireOp {
  const kind = readEnum(message, 'kind', opKinds)
  const offset = readU64(message, 'offset')
  const length = readU64(message, 'length')
  if (!Number.isSafeInteger(offset + length)) fail('UNSAFE_INTEGER', 'offset + length beyond 2^53')
  const data = readBytes(message, 'data')
  if (kind === 'write' ? data.length !== length : data.length !== 0) {
    fail('LENGTH_MISMATCH', `${kind} of length ${length} carries ${data.length} data bytes`)
  }
  return {
    epoch: readU64(message, 'epoch'),
    seq: readPositive(message, 'seq'),
    kind,
    offset,
    length,
    data,
    xxh64: readFixed64(message, 'xxh64'),
    fua: readBool(message, 'fua'),
    noHole: readBool(message, 'noHole'),
  }
}

function readEpochSeq(message: Fields): EpochSeq {
  return { epoch: readU64(message, 'epoch'), seq: readPositive(message, 'seq') }
}

function readEpochFlush(message: Fields): EpochFlush {
  return { epoch: readU64(message, 'epoch'), flushId: readPositive(message, 'flushId') }
}

function readGoodbye(message: Fields): Goodbye {
  return {
    reason: readEnum(message, 'reason', goodbyeReasons),
    message: readText(message, 'message', false),
  }
}

/** The name of the one body field set, or a MALFORMED error. */
function bodyOf(message: Fields, names: readonly string[]): string {
  for (const name of names) {
    const value = message[name]
    if (value !== null && value !== undefined) return name
  }
  return fail('MALFORMED', 'no message body')
}

const requestBodies = ['hello', 'ops', 'flush', 'goodbye'] as const

function readRequest(message: Fields): ReplicateRequest {
  const body = bodyOf(message, requestBodies)
  const inner = readMessage(message, body)
  switch (body) {
    case 'hello':
      return { type: 'hello', hello: readHello(inner) }
    case 'ops': {
      const ops = readList(inner, 'ops', batchOpsMax).map(readOp)
      if (ops.length === 0) fail('MISSING_FIELD', 'empty op batch')
      return { type: 'ops', ops }
    }
    case 'flush':
      return { type: 'flush', ...readEpochFlush(inner) }
    default:
      return { type: 'goodbye', ...readGoodbye(inner) }
  }
}

const responseBodies = [
  'helloAck',
  'helloReject',
  'acks',
  'flushAck',
  'reject',
  'rejectFlush',
  'goodbye',
] as const

function readResponse(message: Fields): ReplicateResponse {
  const body = bodyOf(message, responseBodies)
  const inner = readMessage(message, body)
  switch (body) {
    case 'helloAck': {
      const incarnation = readBytes(inner, 'incarnation')
      if (incarnation.length === 0) fail('MISSING_FIELD', 'incarnation missing')
      if (incarnation.length > incarnationBytesMax) fail('TOO_LARGE', 'incarnation too long')
      const helloAck = {
        incarnation,
        epoch: readU64(inner, 'epoch'),
        appliedSeq: readU64(inner, 'appliedSeq'),
      }
      return { type: 'helloAck', helloAck }
    }
    case 'helloReject': {
      const helloReject = {
        code: readEnum(inner, 'code', helloRejectCodes),
        message: readText(inner, 'message', false),
        epoch: readU64(inner, 'epoch'),
      }
      return { type: 'helloReject', helloReject }
    }
    case 'acks': {
      const acks = readList(inner, 'acks', batchAcksMax).map(readEpochSeq)
      if (acks.length === 0) fail('MISSING_FIELD', 'empty ack batch')
      return { type: 'acks', acks }
    }
    case 'flushAck':
      return { type: 'flushAck', ...readEpochFlush(inner) }
    case 'reject':
    case 'rejectFlush': {
      const code = readEnum(inner, 'code', replicationCodes)
      const message = readText(inner, 'message', false)
      if (body === 'reject') return { type: 'reject', ...readEpochSeq(inner), code, message }
      return { type: 'rejectFlush', ...readEpochFlush(inner), code, message }
    }
    default:
      return { type: 'goodbye', ...readGoodbye(inner) }
  }
}

function decodeWith<T>(type: protobuf.Type, read: (message: Fields) => T, bytes: Uint8Array) {
  try {
    const message = type.decode(bytes) as unknown as Fields
    return { ok: true, value: read(message) } as Decoded<T>
  } catch (error) {
    if (error instanceof DecodeError) return { ok: false, error } as Decoded<T>
    // protobufjs throws RangeError/Error on truncated or invalid wire data.
    const text = error instanceof Error ? error.message : String(error)
    return {
      ok: false,
      error: new DecodeError('MALFORMED', `not a message: ${text}`),
    } as Decoded<T>
  }
}

/** Decode bytes from the primary. Never throws. */
export function decodeRequest(bytes: Uint8Array): Decoded<ReplicateRequest> {
  return decodeWith(RequestType, readRequest, bytes)
}

/** Decode bytes from the secondary. Never throws. */
export function decodeResponse(bytes: Uint8Array): Decoded<ReplicateResponse> {
  return decodeWith(ResponseType, readResponse, bytes)
}
