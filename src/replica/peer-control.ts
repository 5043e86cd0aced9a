/**
 * Node-to-node control (service duplex.v1.Peer, proto/duplex/v1/peer.proto): unary calls beside
 * the replication stream. `addPeerControlService` serves a node's `PeerControlHandlers`;
 * `PeerControlClient` calls them on one peer.
 *
 * This file is a gRPC adapter and the codec edge of those calls. Its gRPC method definitions move
 * raw Buffers, so every byte from a peer is decoded here (protobufjs reflection, as in
 * peer-messages.ts) and validated once: uint64 values are safe integers, names and messages are
 * bounded, enums are known, a WRITE's data is exactly `length` bytes and nothing else carries
 * data, payloads stay within `forwardDataBytesMax`. The same checks guard both directions: what
 * a peer sends is refused, what this node is about to send is asserted.
 *
 * - Errors travel inside the reply (`ErrorStatus`), never as a gRPC status. A handler's
 *   DuplexError reaches the caller as a DuplexError with the same code and message; anything
 *   else a handler throws is logged and arrives as IO_ERROR; a malformed request is answered
 *   INVALID_ARGUMENT without reaching the handler. On the client, a malformed reply rejects with
 *   IO_ERROR, and a failed transport (no connection, deadline, cancellation: any gRPC status) with
 *   UNAVAILABLE.
 * - Checksums: a forwarded WRITE carries the xxh64 of its data, checked by the server before the
 *   handler runs; a READ reply carries the xxh64 of its data, checked by the client. The client
 *   retries a forward that failed either check up to `forwardChecksumRetriesMax` times, then
 *   rejects with CHECKSUM_MISMATCH: corrupt bytes never reach a handler or a caller.
 * - Deadlines: one per call (`peerControlDeadlineMsDefault` unless told), covering its retries.
 */
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as grpc from '@grpc/grpc-js'
import protobuf from 'protobufjs'
import { assert } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { ErrorCode } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import { peerKeepaliveTimeMs, peerKeepaliveTimeoutMs, peerMessageBytesMax } from './peer-link.js'
import { loadXxh64 } from './xxh64.js'
import type { Xxh64 } from './xxh64.js'

const MiB = 1024 * 1024

/** Bytes of a forwarded WRITE's data or of a READ's reply (an NBD request's maximum). */
export const forwardDataBytesMax = 32 * MiB
/** Bytes (UTF-8) of a volume or node name. */
export const peerNameBytesMax = 64
/** Bytes (UTF-8) of an error message; longer ones are cut before they are sent. */
export const peerTextBytesMax = 4096
/** Times the client resends a forward whose payload failed its xxh64 check. */
export const forwardChecksumRetriesMax = 3
/** Deadline of a call (including its checksum retries) when the caller names none. */
export const peerControlDeadlineMsDefault = 10_000

/**
 * Options for the grpc.Server that `addPeerControlService` is added to: message sizes that fit a
 * 32 MiB payload (gRPC's default is 4 MiB) and pings as often as `PeerControlClient` sends them.
 */
export const peerControlServerOptions: grpc.ServerOptions = {
  'grpc.keepalive_time_ms': peerKeepaliveTimeMs,
  'grpc.keepalive_timeout_ms': peerKeepaliveTimeoutMs,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': peerKeepaliveTimeMs / 2,
  'grpc.max_send_message_length': peerMessageBytesMax,
  'grpc.max_receive_message_length': peerMessageBytesMax,
}

const clientChannelOptions: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': peerKeepaliveTimeMs,
  'grpc.keepalive_timeout_ms': peerKeepaliveTimeoutMs,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.max_send_message_length': peerMessageBytesMax,
  'grpc.max_receive_message_length': peerMessageBytesMax,
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
}

// ---------------------------------------------------------------------------------------------
// Types

export type ReplicaState = 'UpToDate' | 'Inconsistent'

export interface DescribeReply {
  exists: boolean
  epoch: number
  primary: string
  state: ReplicaState
  sizeBytes: number
}

export type ForwardKind = 'read' | 'write' | 'trim' | 'zero' | 'flush'

export interface ForwardRequest {
  volume: string
  fromNode: string
  kind: ForwardKind
  offset: number
  length: number
  data: Buffer
  fua: boolean
  noHole: boolean
  fastZero: boolean
}

export interface ForwardReply {
  data: Buffer
}

export interface HandoverRequest {
  volume: string
  epoch: number
  toNode: string
  fromNode: string
}

export interface HandoverReply {
  epoch: number
}

export interface PromoteRequest {
  volume: string
}

export interface PromoteReply {
  epoch: number
  primary: string
}

export interface SyncCompleteRequest {
  volume: string
  epoch: number
  fromNode: string
}

/** What a node implements; a thrown DuplexError travels to the caller with its code and message. */
export interface PeerControlHandlers {
  /** A volume this node does not hold: `exists: false` (the other fields are not sent). */
  describe(volume: string): Promise<DescribeReply>
  /** `data` of the reply: `length` bytes for a read, empty for every other kind. */
  forward(request: ForwardRequest): Promise<ForwardReply>
  handover(request: HandoverRequest): Promise<HandoverReply>
  promote(request: PromoteRequest): Promise<PromoteReply>
  syncComplete(request: SyncCompleteRequest): Promise<void>
}

/** A forward request as it travels: with the xxh64 of a WRITE's data (0 otherwise). */
interface WireForwardRequest extends ForwardRequest {
  xxh64: bigint
}

/** A forward reply as it travels: with the xxh64 of a READ's data (0 otherwise). */
interface WireForwardReply {
  data: Buffer
  xxh64: bigint
}

// ---------------------------------------------------------------------------------------------
// Error codes

/** Every ErrorCode: a code missing here, or one not in the union, fails the build. */
const errorCodes = {
  INVALID_ARGUMENT: true,
  OUT_OF_RANGE: true,
  NO_SPACE: true,
  READ_ONLY: true,
  NOT_SUPPORTED: true,
  VOLUME_NOT_FOUND: true,
  VOLUME_EXISTS: true,
  VOLUME_BUSY: true,
  STORE_LOCKED: true,
  STORE_CORRUPT: true,
  IO_ERROR: true,
  SHUTTING_DOWN: true,
  UNAVAILABLE: true,
  NOT_PRIMARY: true,
  FAILED_PRECONDITION: true,
  CHECKSUM_MISMATCH: true,
} satisfies Record<ErrorCode, true>

function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(errorCodes, code)
}

/** The error a caller sees for an ErrorStatus from the peer. */
function remoteError(code: string, message: string): DuplexError {
  if (isErrorCode(code)) return new DuplexError(code, message)
  return new DuplexError('IO_ERROR', `peer failed with unknown code ${code}: ${message}`)
}

function malformedReply(reason: string): DuplexError {
  return new DuplexError('IO_ERROR', `peer sent a malformed reply: ${reason}`)
}

// ---------------------------------------------------------------------------------------------
// Checks, shared by both directions: a problem found in received bytes makes them malformed; in
// values about to be sent, it is a programmer error (assert).

type Problem = string | undefined

function firstProblem(...problems: Problem[]): Problem {
  return problems.find((problem) => problem !== undefined)
}

function assertNoProblem(problem: Problem, what: string): void {
  assert(problem === undefined, `${what}: ${problem ?? ''}`)
}

function uintProblem(value: number, name: string): Problem {
  if (Number.isSafeInteger(value) && value >= 0) return undefined
  return `${name} ${value} is not a safe unsigned integer`
}

function textProblem(value: string, name: string, bytesMax: number, required: boolean): Problem {
  if (required && value.length === 0) return `${name} missing`
  if (Buffer.byteLength(value) > bytesMax) return `${name} longer than ${bytesMax} bytes`
  return undefined
}

function nameProblem(value: string, name: string, required = true): Problem {
  return textProblem(value, name, peerNameBytesMax, required)
}

function describeReplyProblem(reply: DescribeReply): Problem {
  return firstProblem(
    uintProblem(reply.epoch, 'epoch'),
    nameProblem(reply.primary, 'primary', false),
    uintProblem(reply.sizeBytes, 'sizeBytes'),
  )
}

function forwardRequestProblem(request: ForwardRequest): Problem {
  const { kind, offset, length, data } = request
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.fromNode, 'fromNode'),
    uintProblem(offset, 'offset'),
    uintProblem(length, 'length'),
    Number.isSafeInteger(offset + length) ? undefined : 'offset + length beyond 2^53',
    (kind === 'write' ? data.length !== length : data.length !== 0)
      ? `${kind} of length ${length} carries ${data.length} data bytes`
      : undefined,
    (kind === 'read' || kind === 'write') && length > forwardDataBytesMax
      ? `${kind} of ${length} bytes, more than ${forwardDataBytesMax}`
      : undefined,
    kind === 'flush' && (offset !== 0 || length !== 0) ? 'flush with a range' : undefined,
    kind !== 'zero' && (request.noHole || request.fastZero)
      ? `noHole or fastZero on a ${kind}`
      : undefined,
  )
}

function forwardReplyProblem(reply: WireForwardReply): Problem {
  if (reply.data.length <= forwardDataBytesMax) return undefined
  return `${reply.data.length} data bytes, more than ${forwardDataBytesMax}`
}

function handoverRequestProblem(request: HandoverRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    uintProblem(request.epoch, 'epoch'),
    nameProblem(request.toNode, 'toNode'),
    nameProblem(request.fromNode, 'fromNode'),
  )
}

function syncCompleteRequestProblem(request: SyncCompleteRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    uintProblem(request.epoch, 'epoch'),
    nameProblem(request.fromNode, 'fromNode'),
  )
}

// ---------------------------------------------------------------------------------------------
// Schema

/** dist/src/replica/peer-control.js -> proto/ at the repository (or package) root. */
export const peerControlProtoPath = join(
  dirname(fileURLToPath(import.meta.url)),
  '../../../proto/duplex/v1/peer.proto',
)

const root = protobuf.loadSync(peerControlProtoPath)

const replicaStates: readonly ReplicaState[] = ['UpToDate', 'Inconsistent']
const forwardKinds: readonly ForwardKind[] = ['read', 'write', 'trim', 'zero', 'flush']

/** Wire value of a string enum listed in `values` (UNSPECIFIED = 0 comes first on the wire). */
function enumToWire<T>(values: readonly T[], value: T): number {
  const index = values.indexOf(value)
  assert(index >= 0, `unknown enum value ${String(value)}`)
  return index + 1
}

/** A protobufjs message as plain fields: written by the encoders, validated by the readers. */
type Fields = Record<string, unknown>

/** One unary call: its types on the wire, and how to write and read each side. */
interface Rpc<Request, Reply> {
  readonly name: string
  readonly path: string
  readonly requestType: protobuf.Type
  readonly replyType: protobuf.Type
  readonly requestProblem: (request: Request) => Problem
  readonly writeRequest: (request: Request) => Fields
  readonly readRequest: (message: Fields) => Request
  readonly replyProblem: (reply: Reply) => Problem
  readonly writeReply: (reply: Reply) => Fields
  readonly readReply: (message: Fields) => Reply
}

type RpcCodec<Request, Reply> = Omit<
  Rpc<Request, Reply>,
  'name' | 'path' | 'requestType' | 'replyType'
>

function rpc<Request, Reply>(name: string, codec: RpcCodec<Request, Reply>): Rpc<Request, Reply> {
  return {
    name,
    path: `/duplex.v1.Peer/${name}`,
    requestType: root.lookupType(`duplex.v1.${name}Request`),
    replyType: root.lookupType(`duplex.v1.${name}Reply`),
    ...codec,
  }
}

const identity = (buffer: Buffer): Buffer => buffer

function method(call: { name: string; path: string }): grpc.MethodDefinition<Buffer, Buffer> {
  return {
    path: call.path,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: call.name.charAt(0).toLowerCase() + call.name.slice(1),
  }
}

// ---------------------------------------------------------------------------------------------
// Readers: each throws Malformed; only the edges (server answer, client exchange) catch it.

class Malformed extends Error {
  override name = 'Malformed'
}

function fail(message: string): never {
  throw new Malformed(message)
}

function failOn(problem: Problem): void {
  if (problem !== undefined) fail(problem)
}

/** protobufjs writes 64-bit values from `{low, high}` and reads them as Long (same shape). */
interface LongBits {
  low: number
  high: number
}

function isLongBits(value: unknown): value is LongBits {
  if (typeof value !== 'object' || value === null) return false
  const { low, high } = value as Partial<LongBits>
  return typeof low === 'number' && typeof high === 'number'
}

function fixed64(value: bigint): LongBits {
  assert(value >= 0n && value < 1n << 64n, 'xxh64 must fit in 64 bits')
  return { low: Number(value & 0xffffffffn) | 0, high: Number(value >> 32n) | 0 }
}

function readU64(message: Fields, name: string): number {
  const value = message[name]
  if (typeof value === 'number') {
    failOn(uintProblem(value, name))
    return value
  }
  if (!isLongBits(value)) return fail(`${name} is not an integer`)
  const high = value.high >>> 0
  if (high >= 0x200000) fail(`${name} exceeds 2^53`)
  return high * 0x100000000 + (value.low >>> 0)
}

function readFixed64(message: Fields, name: string): bigint {
  const value = message[name]
  if (typeof value === 'number') return BigInt(value)
  if (!isLongBits(value)) return fail(`${name} is not an integer`)
  return (BigInt(value.high >>> 0) << 32n) | BigInt(value.low >>> 0)
}

function readBool(message: Fields, name: string): boolean {
  const value = message[name]
  if (typeof value !== 'boolean') return fail(`${name} is not a bool`)
  return value
}

const emptyBytes = Buffer.alloc(0)

function readBytes(message: Fields, name: string): Buffer {
  const value = message[name]
  // An absent bytes field reads as protobufjs's shared empty-array default.
  if (Array.isArray(value) && value.length === 0) return emptyBytes
  if (!(value instanceof Uint8Array)) return fail(`${name} is not bytes`)
  return toBuffer(value)
}

function readString(message: Fields, name: string): string {
  const value = message[name]
  if (typeof value !== 'string') return fail(`${name} is not a string`)
  return value
}

function readName(message: Fields, name: string, required = true): string {
  const value = readString(message, name)
  failOn(nameProblem(value, name, required))
  return value
}

/** An enum value listed in `values`; 0 (UNSPECIFIED) reads as undefined. */
function readEnum<T>(message: Fields, name: string, values: readonly T[]): T | undefined {
  const value = message[name]
  if (typeof value !== 'number') return fail(`${name} is not an enum`)
  if (value === 0) return undefined
  const known = values[value - 1]
  if (known === undefined) return fail(`${name} ${value} unknown`)
  return known
}

function readRequiredEnum<T>(message: Fields, name: string, values: readonly T[]): T {
  return readEnum(message, name, values) ?? fail(`${name} missing`)
}

function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length)
}

function encodeMessage(type: protobuf.Type, fields: Fields): Buffer {
  return toBuffer(type.encode(fields).finish())
}

function decodeMessage<T>(type: protobuf.Type, bytes: Uint8Array, read: (m: Fields) => T): T {
  let message: Fields
  try {
    message = type.decode(bytes)
  } catch (error) {
    // protobufjs throws RangeError/Error on truncated or invalid wire data.
    return fail(`not a ${type.name}: ${errorMessage(error)}`)
  }
  return read(message)
}

// ---------------------------------------------------------------------------------------------
// The five calls

const describeRpc = rpc<{ volume: string }, DescribeReply>('Describe', {
  requestProblem: (request) => nameProblem(request.volume, 'volume'),
  writeRequest: (request) => ({ volume: request.volume }),
  readRequest: (message) => ({ volume: readName(message, 'volume') }),
  replyProblem: describeReplyProblem,
  writeReply: (reply) => {
    if (!reply.exists) return { exists: false }
    return {
      exists: true,
      epoch: reply.epoch,
      primary: reply.primary,
      state: enumToWire(replicaStates, reply.state),
      sizeBytes: reply.sizeBytes,
    }
  },
  readReply: (message) => {
    const reply = {
      exists: readBool(message, 'exists'),
      epoch: readU64(message, 'epoch'),
      primary: readName(message, 'primary', false),
      state: readEnum(message, 'state', replicaStates),
      sizeBytes: readU64(message, 'sizeBytes'),
    }
    if (reply.exists) {
      return { ...reply, state: reply.state ?? fail('state missing') }
    }
    const unset = reply.epoch === 0 && reply.primary === '' && reply.sizeBytes === 0
    if (!unset || reply.state !== undefined) fail('fields set for a volume that does not exist')
    return { ...reply, state: 'Inconsistent' }
  },
})

const forwardRpc = rpc<WireForwardRequest, WireForwardReply>('Forward', {
  requestProblem: forwardRequestProblem,
  // Written as given (no asserts): the client checks the caller's request before its test hook
  // may corrupt the copy that is sent.
  writeRequest: (request) => ({
    volume: request.volume,
    fromNode: request.fromNode,
    kind: enumToWire(forwardKinds, request.kind),
    offset: request.offset,
    length: request.length,
    data: request.data,
    xxh64: fixed64(request.xxh64),
    fua: request.fua,
    noHole: request.noHole,
    fastZero: request.fastZero,
  }),
  readRequest: (message) => {
    const request = {
      volume: readString(message, 'volume'),
      fromNode: readString(message, 'fromNode'),
      kind: readRequiredEnum(message, 'kind', forwardKinds),
      offset: readU64(message, 'offset'),
      length: readU64(message, 'length'),
      data: readBytes(message, 'data'),
      xxh64: readFixed64(message, 'xxh64'),
      fua: readBool(message, 'fua'),
      noHole: readBool(message, 'noHole'),
      fastZero: readBool(message, 'fastZero'),
    }
    failOn(forwardRequestProblem(request))
    if (request.kind !== 'write' && request.xxh64 !== 0n) fail(`xxh64 set on a ${request.kind}`)
    return request
  },
  replyProblem: forwardReplyProblem,
  writeReply: (reply) => ({ data: reply.data, xxh64: fixed64(reply.xxh64) }),
  readReply: (message) => {
    const reply = { data: readBytes(message, 'data'), xxh64: readFixed64(message, 'xxh64') }
    failOn(forwardReplyProblem(reply))
    return reply
  },
})

const handoverRpc = rpc<HandoverRequest, HandoverReply>('Handover', {
  requestProblem: handoverRequestProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => {
    const request = {
      volume: readString(message, 'volume'),
      epoch: readU64(message, 'epoch'),
      toNode: readString(message, 'toNode'),
      fromNode: readString(message, 'fromNode'),
    }
    failOn(handoverRequestProblem(request))
    return request
  },
  replyProblem: (reply) => uintProblem(reply.epoch, 'epoch'),
  writeReply: (reply) => ({ epoch: reply.epoch }),
  readReply: (message) => ({ epoch: readU64(message, 'epoch') }),
})

const promoteRpc = rpc<PromoteRequest, PromoteReply>('Promote', {
  requestProblem: (request) => nameProblem(request.volume, 'volume'),
  writeRequest: (request) => ({ volume: request.volume }),
  readRequest: (message) => ({ volume: readName(message, 'volume') }),
  replyProblem: (reply) =>
    firstProblem(uintProblem(reply.epoch, 'epoch'), nameProblem(reply.primary, 'primary')),
  writeReply: (reply) => ({ epoch: reply.epoch, primary: reply.primary }),
  readReply: (message) => ({
    epoch: readU64(message, 'epoch'),
    primary: readName(message, 'primary'),
  }),
})

const syncCompleteRpc = rpc<SyncCompleteRequest, undefined>('SyncComplete', {
  requestProblem: syncCompleteRequestProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => {
    const request = {
      volume: readString(message, 'volume'),
      epoch: readU64(message, 'epoch'),
      fromNode: readString(message, 'fromNode'),
    }
    failOn(syncCompleteRequestProblem(request))
    return request
  },
  replyProblem: () => undefined,
  writeReply: () => ({}),
  readReply: () => undefined,
})

/** The Peer service over raw bytes (our codecs do the decoding); tests build hostile peers on it. */
export const peerService: grpc.ServiceDefinition = {
  Describe: method(describeRpc),
  Forward: method(forwardRpc),
  Handover: method(handoverRpc),
  Promote: method(promoteRpc),
  SyncComplete: method(syncCompleteRpc),
}

// ---------------------------------------------------------------------------------------------
// Replies: a value, or the error status that replaced it.

type Answer<T> = { ok: true; value: T } | { ok: false; code: string; message: string }

/** Error codes are ErrorCode names; this bounds what an unknown one may cost. */
const errorCodeBytesMax = 64

function readAnswer<T>(message: Fields, read: (message: Fields) => T): Answer<T> {
  const error = message.error
  if (error === null || error === undefined) return { ok: true, value: read(message) }
  if (typeof error !== 'object') return fail('error is not a message')
  const status = error as Fields
  const code = readString(status, 'code')
  const text = readString(status, 'message')
  failOn(textProblem(code, 'error code', errorCodeBytesMax, true))
  failOn(textProblem(text, 'error message', peerTextBytesMax, false))
  return { ok: false, code, message: text }
}

/** `text` cut to `peerTextBytesMax` UTF-8 bytes (a cut character becomes one U+FFFD). */
function boundedText(text: string): string {
  if (Buffer.byteLength(text) <= peerTextBytesMax) return text
  return Buffer.from(text)
    .subarray(0, peerTextBytesMax - 3)
    .toString()
}

function encodeError(call: { replyType: protobuf.Type }, code: ErrorCode, message: string): Buffer {
  return encodeMessage(call.replyType, { error: { code, message: boundedText(message) } })
}

// ---------------------------------------------------------------------------------------------
// Server

interface ServeContext {
  log: Logger
  peer: string
}

/** The reply bytes for request `bytes`. Never rejects: every failure becomes an ErrorStatus. */
async function answer<Request, Reply>(
  call: Rpc<Request, Reply>,
  bytes: Buffer,
  run: (request: Request) => Promise<Reply>,
  context: ServeContext,
): Promise<Buffer> {
  let request: Request
  try {
    request = decodeMessage(call.requestType, bytes, call.readRequest)
  } catch (error) {
    const reason = errorMessage(error)
    context.log.warn('malformed request', { rpc: call.name, peer: context.peer, reason })
    return encodeError(call, 'INVALID_ARGUMENT', `malformed ${call.name} request: ${reason}`)
  }
  try {
    const reply = await run(request)
    assertNoProblem(call.replyProblem(reply), `${call.name} handler reply`)
    return encodeMessage(call.replyType, call.writeReply(reply))
  } catch (error) {
    if (error instanceof DuplexError) return encodeError(call, error.code, error.message)
    const reason = errorMessage(error)
    context.log.error('handler failed', { rpc: call.name, peer: context.peer, error: reason })
    return encodeError(call, 'IO_ERROR', `${call.name} failed on the peer: ${reason}`)
  }
}

function unary<Request, Reply>(
  call: Rpc<Request, Reply>,
  run: (request: Request) => Promise<Reply>,
  log: Logger,
): grpc.handleUnaryCall<Buffer, Buffer> {
  return (serverCall, callback) => {
    const context = { log, peer: serverCall.getPeer() }
    answer(call, serverCall.request, run, context).then(
      (reply) => {
        callback(null, reply)
      },
      (error: unknown) => {
        // Unreachable unless encoding an error status itself failed; never crash the node.
        log.error('cannot answer', { rpc: call.name, error: errorMessage(error) })
        callback({ code: grpc.status.INTERNAL, details: errorMessage(error) })
      },
    )
  }
}

/** Check a WRITE's payload, run the handler, check and checksum its reply. */
async function serveForward(
  request: WireForwardRequest,
  handlers: PeerControlHandlers,
  xxh64: Xxh64,
  log: Logger,
): Promise<WireForwardReply> {
  const { xxh64: sent, ...forward } = request
  if (forward.kind === 'write' && xxh64(forward.data) !== sent) {
    const { volume, fromNode, offset, length } = forward
    log.warn('forwarded write failed its xxh64 check', { volume, fromNode, offset, length })
    const where = `${length} bytes at ${offset}`
    throw new DuplexError('CHECKSUM_MISMATCH', `forwarded write of ${where} failed its xxh64 check`)
  }
  const { data } = await handlers.forward(forward)
  const expected = forward.kind === 'read' ? forward.length : 0
  assert(
    data.length === expected,
    `forward handler returned ${data.length} bytes for a ${forward.kind} of ${forward.length}`,
  )
  return { data, xxh64: forward.kind === 'read' ? xxh64(data) : 0n }
}

/**
 * Adds the Peer service to a grpc.Server (call before bindAsync). Async because it loads xxh64
 * (a WebAssembly module, once per process) before any call can arrive. Create the server with
 * `peerControlServerOptions` (or at least its message sizes): gRPC's default 4 MiB limit would
 * refuse large forwards.
 */
export async function addPeerControlService(
  server: grpc.Server,
  handlers: PeerControlHandlers,
  log: Logger,
): Promise<void> {
  const xxh64 = await loadXxh64()
  server.addService(peerService, {
    Describe: unary(describeRpc, ({ volume }) => handlers.describe(volume), log),
    Forward: unary(forwardRpc, (request) => serveForward(request, handlers, xxh64, log), log),
    Handover: unary(handoverRpc, (request) => handlers.handover(request), log),
    Promote: unary(promoteRpc, (request) => handlers.promote(request), log),
    SyncComplete: unary(
      syncCompleteRpc,
      async (request) => {
        await handlers.syncComplete(request)
        return undefined
      },
      log,
    ),
  })
}

// ---------------------------------------------------------------------------------------------
// Client

export interface PeerControlClientOptions {
  /** Plaintext by default. */
  credentials?: grpc.ChannelCredentials
  /** Merged over the defaults (keepalive, message sizes, reconnect backoff). */
  channelOptions?: grpc.ChannelOptions
  /** default deadline per call */
  deadlineMs?: number
  /** Test hook: change a copy of each forward request after its checksum was computed. */
  mutateOutgoing?: (request: ForwardRequest) => void
}

/** Calls the Peer service of one node. One gRPC channel, connected lazily, reconnecting. */
export class PeerControlClient {
  private readonly client: grpc.Client
  private readonly deadlineMs: number
  private closed = false

  constructor(
    private readonly address: string,
    private readonly options: PeerControlClientOptions = {},
  ) {
    this.deadlineMs = options.deadlineMs ?? peerControlDeadlineMsDefault
    this.client = new grpc.Client(
      address,
      options.credentials ?? grpc.credentials.createInsecure(),
      { ...clientChannelOptions, ...options.channelOptions },
    )
  }

  /**
   * The peer's replica of `volume`. One it does not hold reads as
   * `{ exists: false, epoch: 0, primary: '', state: 'Inconsistent', sizeBytes: 0 }`.
   */
  describe(volume: string, deadlineMs?: number): Promise<DescribeReply> {
    return this.invoke(describeRpc, { volume }, deadlineMs)
  }

  /** Run an NBD request on the peer; a READ resolves with exactly `length` verified bytes. */
  async forward(request: ForwardRequest, deadlineMs?: number): Promise<ForwardReply> {
    assertNoProblem(forwardRequestProblem(request), 'forward request')
    const deadline = this.deadline(deadlineMs)
    const xxh64 = await loadXxh64()
    let failure = ''
    for (let attempt = 0; attempt <= forwardChecksumRetriesMax; attempt++) {
      const answer = await this.exchange(forwardRpc, this.forwardBytes(request, xxh64), deadline)
      if (!answer.ok) {
        if (answer.code !== 'CHECKSUM_MISMATCH') throw remoteError(answer.code, answer.message)
        failure = answer.message
        continue
      }
      const { data, xxh64: sum } = answer.value
      checkForwardReply(request, data, sum)
      if (request.kind !== 'read' || xxh64(data) === sum) return { data }
      failure = `read reply of ${data.length} bytes failed its xxh64 check`
    }
    const attempts = forwardChecksumRetriesMax + 1
    const message = `forward ${request.kind} to ${this.address}, ${attempts} attempts: ${failure}`
    throw new DuplexError('CHECKSUM_MISMATCH', message)
  }

  handover(request: HandoverRequest, deadlineMs?: number): Promise<HandoverReply> {
    return this.invoke(handoverRpc, request, deadlineMs)
  }

  promote(request: PromoteRequest, deadlineMs?: number): Promise<PromoteReply> {
    return this.invoke(promoteRpc, request, deadlineMs)
  }

  syncComplete(request: SyncCompleteRequest, deadlineMs?: number): Promise<void> {
    return this.invoke(syncCompleteRpc, request, deadlineMs)
  }

  /** Close the channel; calls after this reject with SHUTTING_DOWN. */
  close(): void {
    this.closed = true
    this.client.close()
  }

  private deadline(deadlineMs = this.deadlineMs): Date {
    assert(Number.isFinite(deadlineMs) && deadlineMs > 0, 'deadlineMs must be positive')
    return new Date(Date.now() + deadlineMs)
  }

  private async invoke<Request, Reply>(
    call: Rpc<Request, Reply>,
    request: Request,
    deadlineMs: number | undefined,
  ): Promise<Reply> {
    assertNoProblem(call.requestProblem(request), `${call.name} request`)
    const bytes = encodeMessage(call.requestType, call.writeRequest(request))
    const answer = await this.exchange(call, bytes, this.deadline(deadlineMs))
    if (answer.ok) return answer.value
    throw remoteError(answer.code, answer.message)
  }

  /** The bytes of one forward attempt: checksummed, then handed to the test hook. */
  private forwardBytes(request: ForwardRequest, xxh64: Xxh64): Buffer {
    const wire = { ...request, xxh64: request.kind === 'write' ? xxh64(request.data) : 0n }
    if (this.options.mutateOutgoing !== undefined) {
      wire.data = Buffer.from(wire.data)
      this.options.mutateOutgoing(wire)
    }
    return encodeMessage(forwardRpc.requestType, forwardRpc.writeRequest(wire))
  }

  /** One gRPC call: the decoded answer, or a DuplexError (UNAVAILABLE, IO_ERROR, SHUTTING_DOWN). */
  private exchange<Request, Reply>(
    call: Rpc<Request, Reply>,
    bytes: Buffer,
    deadline: Date,
  ): Promise<Answer<Reply>> {
    if (this.closed) {
      const message = `peer control client for ${this.address} is closed`
      return Promise.reject(new DuplexError('SHUTTING_DOWN', message))
    }
    const metadata = new grpc.Metadata({ waitForReady: false })
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        call.path,
        identity,
        identity,
        bytes,
        metadata,
        { deadline },
        (error, reply) => {
          if (error !== null) {
            reject(this.transportError(error))
            return
          }
          try {
            resolve(readReply(call, reply))
          } catch (failure) {
            reject(malformedReply(errorMessage(failure)))
          }
        },
      )
    })
  }

  private transportError(error: grpc.ServiceError): DuplexError {
    const status = `${grpc.status[error.code]}: ${error.details}`
    return new DuplexError('UNAVAILABLE', `peer ${this.address} unreachable: ${status}`, {
      cause: error,
    })
  }
}

/** Decode a reply (throws Malformed). */
function readReply<Request, Reply>(
  call: Rpc<Request, Reply>,
  bytes: Buffer | undefined,
): Answer<Reply> {
  if (bytes === undefined) return fail('no reply message')
  return decodeMessage(call.replyType, bytes, (message) => readAnswer(message, call.readReply))
}

/** A forward reply must carry exactly the bytes its request asked for (none but for a READ). */
function checkForwardReply(request: ForwardRequest, data: Buffer, sum: bigint): void {
  if (request.kind === 'read') {
    if (data.length !== request.length) {
      throw malformedReply(`${data.length} bytes for a read of ${request.length}`)
    }
  } else if (data.length !== 0 || sum !== 0n) {
    throw malformedReply(`data or xxh64 in the reply to a ${request.kind}`)
  }
}
