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
import type * as grpc from '@grpc/grpc-js'
import { assert } from '../core/assert.js'
import { DuplexError } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import {
  assertNoProblem,
  enumToWire,
  fail,
  failOn,
  firstProblem,
  fixed64,
  malformedReply,
  method,
  nameBytesMax,
  nameProblem,
  readBool,
  readBytes,
  readEnum,
  readFixed64,
  readName,
  readRequiredEnum,
  readString,
  readU64,
  readU64List,
  readFixed64List,
  readRepeated,
  remoteError,
  rpc as unaryRpc,
  textBytesMax,
  textProblem,
  uintProblem,
  unary,
  UnaryClient,
  encodeMessage,
  loadProto,
} from '../core/unary-rpc.js'
import type { Caller, Fields, Problem, Rpc, RpcCodec } from '../core/unary-rpc.js'
import { denied, requireRole } from '../core/authorization.js'
import { peerKeepaliveTimeMs, peerKeepaliveTimeoutMs, peerMessageBytesMax } from './peer-link.js'
import { generationHistoryMax } from './store.js'
import type { GenerationEntry } from './store.js'
import { loadXxh64 } from './xxh64.js'
import type { Xxh64 } from './xxh64.js'

const MiB = 1024 * 1024

/** Bytes of a forwarded WRITE's data or of a READ's reply (an NBD request's maximum). */
export const forwardDataBytesMax = 32 * MiB
/** Bytes (UTF-8) of a volume or node name. */
export const peerNameBytesMax = nameBytesMax
/** Bytes (UTF-8) of an error message; longer ones are cut before they are sent. */
export const peerTextBytesMax = textBytesMax
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

export type ReplicaState = 'UpToDate' | 'Inconsistent' | 'Outdated'

export interface DescribeReply {
  exists: boolean
  epoch: number
  primary: string
  state: ReplicaState
  sizeBytes: number
  /** Extents hot in the replica's own activity log (resync copies them too). */
  hotExtents: number[]
  /** Bytes per activity-log extent (0 when there are no hot extents). */
  extentBytes: number
  /** The replica ran alone (degraded): its peer lacks writes. */
  dirty: boolean
  /** The machine's boot id (src/core/boot-id.ts); '' when unknown. */
  bootId: string
  /** The generations the replica entered (history.ts). */
  history: GenerationEntry[]
  /** A primary's sync or resync to its peer: bytes copied and to copy (0 and 0: none runs). */
  syncBytesDone: number
  syncBytesTotal: number
  /** Moving to another node: bytes of the volume the copy covered, and its size (0, 0: not). */
  moveBytesDone: number
  moveBytesTotal: number
}

/** How `describe` reads a volume the peer does not hold. */
export const absentReplica: Readonly<DescribeReply> = Object.freeze({
  exists: false,
  epoch: 0,
  primary: '',
  state: 'Inconsistent',
  sizeBytes: 0,
  hotExtents: [],
  extentBytes: 0,
  dirty: false,
  bootId: '',
  history: [],
  syncBytesDone: 0,
  syncBytesTotal: 0,
  moveBytesDone: 0,
  moveBytesTotal: 0,
})

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
  /** Without the peer and the witness: the admin takes the risk of a split brain. */
  force?: boolean
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

export interface ChecksumRequest {
  volume: string
  offset: number
  length: number
  chunkBytes: number
}

export interface ChecksumReply {
  /** xxh64 of each chunk, in order. */
  sums: bigint[]
}

export interface RepairRequest {
  volume: string
  ranges: { offset: number; length: number }[]
}

export interface RepairReply {
  bytes: number
}

/** Bytes one Checksum call may cover. */
export const checksumRangeBytesMax = 64 * MiB
/** Chunk sizes a Checksum may use. */
export const checksumChunkBytesMin = 4096
export const checksumChunkBytesMax = 16 * MiB
/** Ranges one Repair may name. */
export const repairRangesMax = 4096

export interface ResolveRequest {
  volume: string
  keep: string
}

export interface RenewLeaseRequest {
  volume: string
  fromNode: string
  epoch: number
}

export interface RenewLeaseReply {
  granted: boolean
  epoch: number
}

export interface MoveBeginRequest {
  volume: string
  fromNode: string
  sizeBytes: number
}

/** A piece of a moving replica: `data` (`length` bytes) at `offset`, or a hole. */
export interface MoveWriteRequest {
  volume: string
  fromNode: string
  offset: number
  length: number
  data: Buffer
  hole: boolean
}

export interface MoveAdoptRequest {
  volume: string
  fromNode: string
  epoch: number
  primary: string
  state: ReplicaState
  history: GenerationEntry[]
}

export interface MoveAdoptReply {
  bootId: string
}

export interface MoveCutoverRequest {
  volume: string
  fromNode: string
  toNode: string
  epoch: number
}

export interface MoveCutoverReply {
  epoch: number
}

export interface MoveFinishRequest {
  volume: string
  fromNode: string
  toNode: string
  epoch: number
}

/** Bytes one MoveWrite carries. */
export const moveWriteBytesMax = 4 * MiB

/** What a node implements; a thrown DuplexError travels to the caller with its code and message. */
export interface PeerControlHandlers {
  /** A volume this node does not hold: `exists: false` (the other fields are not sent). */
  describe(volume: string): Promise<DescribeReply>
  /** `data` of the reply: `length` bytes for a read, empty for every other kind. */
  forward(request: ForwardRequest): Promise<ForwardReply>
  handover(request: HandoverRequest): Promise<HandoverReply>
  promote(request: PromoteRequest): Promise<PromoteReply>
  syncComplete(request: SyncCompleteRequest): Promise<void>
  renewLease(request: RenewLeaseRequest): Promise<RenewLeaseReply>
  checksum(request: ChecksumRequest): Promise<ChecksumReply>
  repair(request: RepairRequest): Promise<RepairReply>
  resolve(request: ResolveRequest): Promise<void>
  moveBegin(request: MoveBeginRequest): Promise<void>
  moveWrite(request: MoveWriteRequest): Promise<void>
  moveAdopt(request: MoveAdoptRequest): Promise<MoveAdoptReply>
  moveCutover(request: MoveCutoverRequest): Promise<MoveCutoverReply>
  moveFinish(request: MoveFinishRequest): Promise<MoveAdoptReply>
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
// Checks, shared by both directions (see unary-rpc.ts)

/** Hot extents a Describe may list (64 Ki extents of 4 MiB: a 256 TiB volume wholly hot). */
export const describeHotExtentsMax = 65_536

function describeReplyProblem(reply: DescribeReply): Problem {
  return firstProblem(
    uintProblem(reply.epoch, 'epoch'),
    nameProblem(reply.primary, 'primary', false),
    uintProblem(reply.sizeBytes, 'sizeBytes'),
    uintProblem(reply.extentBytes, 'extentBytes'),
    uintProblem(reply.syncBytesDone, 'syncBytesDone'),
    uintProblem(reply.syncBytesTotal, 'syncBytesTotal'),
    reply.syncBytesDone > reply.syncBytesTotal ? 'syncBytesDone over syncBytesTotal' : undefined,
    uintProblem(reply.moveBytesDone, 'moveBytesDone'),
    uintProblem(reply.moveBytesTotal, 'moveBytesTotal'),
    reply.moveBytesDone > reply.moveBytesTotal ? 'moveBytesDone over moveBytesTotal' : undefined,
    textProblem(reply.bootId, 'bootId', 64, false),
    reply.history.length > generationHistoryMax ? 'history too long' : undefined,
    ...reply.history.map((entry) =>
      firstProblem(uintProblem(entry.generation, 'generation'), nameProblem(entry.owner, 'owner')),
    ),
    reply.hotExtents.length > describeHotExtentsMax
      ? `more than ${describeHotExtentsMax} hot extents`
      : undefined,
    reply.hotExtents.length > 0 && reply.extentBytes === 0 ? 'hot extents of 0 bytes' : undefined,
    ...reply.hotExtents.map((extent) => uintProblem(extent, 'hotExtents')),
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

/** The Peer service's schema (tests encode raw messages with it). */
export const peerControlProto = loadProto('duplex/v1/peer.proto')
const root = peerControlProto

function rpc<Request, Reply>(name: string, codec: RpcCodec<Request, Reply>): Rpc<Request, Reply> {
  return unaryRpc(root, 'duplex.v1.Peer', name, codec)
}

function readHistory(message: Fields): GenerationEntry[] {
  return readRepeated(message, 'history', generationHistoryMax, (entry) => ({
    generation: readU64(entry, 'generation'),
    owner: readName(entry, 'owner'),
    forced: readBool(entry, 'forced'),
  }))
}

const replicaStates: readonly ReplicaState[] = ['UpToDate', 'Inconsistent', 'Outdated']
const forwardKinds: readonly ForwardKind[] = ['read', 'write', 'trim', 'zero', 'flush']

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
      hotExtents: reply.hotExtents,
      extentBytes: reply.extentBytes,
      dirty: reply.dirty,
      bootId: reply.bootId,
      history: reply.history,
      syncBytesDone: reply.syncBytesDone,
      syncBytesTotal: reply.syncBytesTotal,
      moveBytesDone: reply.moveBytesDone,
      moveBytesTotal: reply.moveBytesTotal,
    }
  },
  readReply: (message) => {
    const reply = {
      exists: readBool(message, 'exists'),
      epoch: readU64(message, 'epoch'),
      primary: readName(message, 'primary', false),
      state: readEnum(message, 'state', replicaStates),
      sizeBytes: readU64(message, 'sizeBytes'),
      hotExtents: readU64List(message, 'hotExtents', describeHotExtentsMax),
      extentBytes: readU64(message, 'extentBytes'),
      dirty: readBool(message, 'dirty'),
      bootId: readString(message, 'bootId'),
      history: readHistory(message),
      syncBytesDone: readU64(message, 'syncBytesDone'),
      syncBytesTotal: readU64(message, 'syncBytesTotal'),
      moveBytesDone: readU64(message, 'moveBytesDone'),
      moveBytesTotal: readU64(message, 'moveBytesTotal'),
    }
    if (reply.exists) {
      failOn(describeReplyProblem({ ...reply, state: 'Inconsistent' }))
      return { ...reply, state: reply.state ?? fail('state missing') }
    }
    const unset =
      reply.epoch === 0 &&
      reply.primary === '' &&
      reply.sizeBytes === 0 &&
      reply.hotExtents.length === 0 &&
      reply.extentBytes === 0 &&
      !reply.dirty &&
      reply.bootId === '' &&
      reply.history.length === 0 &&
      reply.syncBytesTotal === 0 &&
      reply.moveBytesTotal === 0
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
  writeRequest: (request) => ({ volume: request.volume, force: request.force ?? false }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    force: readBool(message, 'force'),
  }),
  replyProblem: (reply) =>
    firstProblem(uintProblem(reply.epoch, 'epoch'), nameProblem(reply.primary, 'primary')),
  writeReply: (reply) => ({ epoch: reply.epoch, primary: reply.primary }),
  readReply: (message) => ({
    epoch: readU64(message, 'epoch'),
    primary: readName(message, 'primary'),
  }),
})

const renewLeaseRpc = rpc<RenewLeaseRequest, RenewLeaseReply>('RenewLease', {
  requestProblem: (request) =>
    firstProblem(
      nameProblem(request.volume, 'volume'),
      nameProblem(request.fromNode, 'fromNode'),
      uintProblem(request.epoch, 'epoch'),
    ),
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    fromNode: readName(message, 'fromNode'),
    epoch: readU64(message, 'epoch'),
  }),
  replyProblem: (reply) => uintProblem(reply.epoch, 'epoch'),
  writeReply: (reply) => ({ granted: reply.granted, epoch: reply.epoch }),
  readReply: (message) => ({
    granted: readBool(message, 'granted'),
    epoch: readU64(message, 'epoch'),
  }),
})

function checksumRequestProblem(request: ChecksumRequest): Problem {
  const { offset, length, chunkBytes } = request
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    uintProblem(offset, 'offset'),
    uintProblem(length, 'length'),
    uintProblem(chunkBytes, 'chunkBytes'),
    length > checksumRangeBytesMax ? `length ${length} above ${checksumRangeBytesMax}` : undefined,
    chunkBytes < checksumChunkBytesMin || chunkBytes > checksumChunkBytesMax
      ? `chunkBytes ${chunkBytes} outside ${checksumChunkBytesMin}..${checksumChunkBytesMax}`
      : undefined,
  )
}

const checksumRpc = rpc<ChecksumRequest, ChecksumReply>('Checksum', {
  requestProblem: checksumRequestProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => {
    const request = {
      volume: readName(message, 'volume'),
      offset: readU64(message, 'offset'),
      length: readU64(message, 'length'),
      chunkBytes: readU64(message, 'chunkBytes'),
    }
    failOn(checksumRequestProblem(request))
    return request
  },
  replyProblem: (reply) =>
    reply.sums.length > checksumRangeBytesMax / checksumChunkBytesMin ? 'too many sums' : undefined,
  writeReply: (reply) => ({ sums: reply.sums.map(fixed64) }),
  readReply: (message) => ({
    sums: readFixed64List(message, 'sums', checksumRangeBytesMax / checksumChunkBytesMin),
  }),
})

function repairRequestProblem(request: RepairRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    request.ranges.length > repairRangesMax ? `more than ${repairRangesMax} ranges` : undefined,
    ...request.ranges.map((range) =>
      firstProblem(
        uintProblem(range.offset, 'offset'),
        uintProblem(range.length, 'length'),
        uintProblem(range.offset + range.length, 'range end'),
      ),
    ),
  )
}

const repairRpc = rpc<RepairRequest, RepairReply>('Repair', {
  requestProblem: repairRequestProblem,
  writeRequest: (request) => ({ volume: request.volume, ranges: request.ranges }),
  readRequest: (message) => {
    const request = {
      volume: readName(message, 'volume'),
      ranges: readRepeated(message, 'ranges', repairRangesMax, (range) => ({
        offset: readU64(range, 'offset'),
        length: readU64(range, 'length'),
      })),
    }
    failOn(repairRequestProblem(request))
    return request
  },
  replyProblem: (reply) => uintProblem(reply.bytes, 'bytes'),
  writeReply: (reply) => ({ bytes: reply.bytes }),
  readReply: (message) => ({ bytes: readU64(message, 'bytes') }),
})

const resolveRpc = rpc<ResolveRequest, undefined>('Resolve', {
  requestProblem: (request) =>
    firstProblem(nameProblem(request.volume, 'volume'), nameProblem(request.keep, 'keep')),
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    keep: readName(message, 'keep'),
  }),
  replyProblem: () => undefined,
  writeReply: () => ({}),
  readReply: () => undefined,
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

const moveBeginRpc = rpc<MoveBeginRequest, undefined>('MoveBegin', {
  requestProblem: (request) =>
    firstProblem(
      nameProblem(request.volume, 'volume'),
      nameProblem(request.fromNode, 'fromNode'),
      uintProblem(request.sizeBytes, 'sizeBytes'),
    ),
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    fromNode: readName(message, 'fromNode'),
    sizeBytes: readU64(message, 'sizeBytes'),
  }),
  replyProblem: () => undefined,
  writeReply: () => ({}),
  readReply: () => undefined,
})

interface WireMoveWrite extends MoveWriteRequest {
  xxh64: bigint
}

function moveWriteProblem(request: MoveWriteRequest): Problem {
  const { offset, length, data, hole } = request
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.fromNode, 'fromNode'),
    uintProblem(offset, 'offset'),
    uintProblem(length, 'length'),
    uintProblem(offset + length, 'range end'),
    length === 0 ? 'an empty range' : undefined,
    hole && data.length > 0 ? 'data with a hole' : undefined,
    !hole && data.length !== length
      ? `${data.length} data bytes for a length of ${length}`
      : undefined,
    !hole && length > moveWriteBytesMax
      ? `${length} bytes, more than ${moveWriteBytesMax}`
      : undefined,
  )
}

const moveWriteRpc = rpc<WireMoveWrite, undefined>('MoveWrite', {
  requestProblem: moveWriteProblem,
  writeRequest: (request) => ({ ...request, xxh64: fixed64(request.xxh64) }),
  readRequest: (message) => {
    const request = {
      volume: readName(message, 'volume'),
      fromNode: readName(message, 'fromNode'),
      offset: readU64(message, 'offset'),
      length: readU64(message, 'length'),
      data: readBytes(message, 'data'),
      xxh64: readFixed64(message, 'xxh64'),
      hole: readBool(message, 'hole'),
    }
    failOn(moveWriteProblem(request))
    return request
  },
  replyProblem: () => undefined,
  writeReply: () => ({}),
  readReply: () => undefined,
})

function moveAdoptProblem(request: MoveAdoptRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.fromNode, 'fromNode'),
    uintProblem(request.epoch, 'epoch'),
    nameProblem(request.primary, 'primary'),
    request.history.length > generationHistoryMax ? 'history too long' : undefined,
  )
}

const moveAdoptRpc = rpc<MoveAdoptRequest, MoveAdoptReply>('MoveAdopt', {
  requestProblem: moveAdoptProblem,
  writeRequest: (request) => ({
    ...request,
    state: enumToWire(replicaStates, request.state),
  }),
  readRequest: (message) => {
    const request = {
      volume: readName(message, 'volume'),
      fromNode: readName(message, 'fromNode'),
      epoch: readU64(message, 'epoch'),
      primary: readName(message, 'primary'),
      state: readRequiredEnum(message, 'state', replicaStates),
      history: readHistory(message),
    }
    failOn(moveAdoptProblem(request))
    return request
  },
  replyProblem: (reply) => textProblem(reply.bootId, 'bootId', nameBytesMax, false),
  writeReply: (reply) => ({ bootId: reply.bootId }),
  readReply: (message) => ({ bootId: readString(message, 'bootId') }),
})

function moveStepProblem(request: MoveCutoverRequest | MoveFinishRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.fromNode, 'fromNode'),
    nameProblem(request.toNode, 'toNode'),
    uintProblem(request.epoch, 'epoch'),
  )
}

function readMoveStep(message: Fields): MoveCutoverRequest {
  const request = {
    volume: readName(message, 'volume'),
    fromNode: readName(message, 'fromNode'),
    toNode: readName(message, 'toNode'),
    epoch: readU64(message, 'epoch'),
  }
  failOn(moveStepProblem(request))
  return request
}

const moveCutoverRpc = rpc<MoveCutoverRequest, MoveCutoverReply>('MoveCutover', {
  requestProblem: moveStepProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: readMoveStep,
  replyProblem: (reply) => uintProblem(reply.epoch, 'epoch'),
  writeReply: (reply) => ({ epoch: reply.epoch }),
  readReply: (message) => ({ epoch: readU64(message, 'epoch') }),
})

const moveFinishRpc = rpc<MoveFinishRequest, MoveAdoptReply>('MoveFinish', {
  requestProblem: moveStepProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: readMoveStep,
  replyProblem: (reply) => textProblem(reply.bootId, 'bootId', nameBytesMax, false),
  writeReply: (reply) => ({ bootId: reply.bootId }),
  readReply: (message) => ({ bootId: readString(message, 'bootId') }),
})

/** The Peer service over raw bytes (our codecs do the decoding); tests build hostile peers on it. */
export const peerService: grpc.ServiceDefinition = {
  Describe: method(describeRpc),
  Forward: method(forwardRpc),
  Handover: method(handoverRpc),
  Promote: method(promoteRpc),
  SyncComplete: method(syncCompleteRpc),
  RenewLease: method(renewLeaseRpc),
  Checksum: method(checksumRpc),
  Repair: method(repairRpc),
  Resolve: method(resolveRpc),
  MoveBegin: method(moveBeginRpc),
  MoveWrite: method(moveWriteRpc),
  MoveAdopt: method(moveAdoptRpc),
  MoveCutover: method(moveCutoverRpc),
  MoveFinish: method(moveFinishRpc),
}

// ---------------------------------------------------------------------------------------------
// Server

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
 * Who may call a node's Peer service under cluster TLS: nodes, each speaking only for itself (a
 * request's `fromNode` must be the name in the caller's certificate), and admins for what the CLI
 * asks (describe, checksum, repair, promote, resolve).
 */
export const peerRules = {
  node:
    (action: string) =>
    (request: { fromNode?: string }, caller: Caller): void => {
      const identity = requireRole(caller, ['node'], action)
      if (request.fromNode !== undefined && request.fromNode !== identity.name) {
        throw denied(caller, action, `the request speaks for ${request.fromNode}`)
      }
    },
  nodeOrAdmin:
    (action: string) =>
    (_request: unknown, caller: Caller): void => {
      requireRole(caller, ['node', 'admin'], action)
    },
}

/**
 * Adds the Peer service to a grpc.Server (call before bindAsync). Async because it loads xxh64
 * (a WebAssembly module, once per process) before any call can arrive. Create the server with
 * `peerControlServerOptions` (or at least its message sizes): gRPC's default 4 MiB limit would
 * refuse large forwards.
 * `secure`: the server runs cluster TLS, so every call is checked against the caller's
 * certificate (peerRules).
 */
export async function addPeerControlService(
  server: grpc.Server,
  handlers: PeerControlHandlers,
  log: Logger,
  secure = false,
): Promise<void> {
  const xxh64 = await loadXxh64()
  const where = 'the peer'
  const rules = secure ? peerRules : undefined
  server.addService(peerService, {
    Describe: unary(
      describeRpc,
      ({ volume }) => handlers.describe(volume),
      log,
      where,
      rules?.nodeOrAdmin('describe'),
    ),
    Forward: unary(
      forwardRpc,
      (request) => serveForward(request, handlers, xxh64, log),
      log,
      where,
      rules?.node('forward'),
    ),
    Handover: unary(
      handoverRpc,
      (request) => handlers.handover(request),
      log,
      where,
      rules?.node('handover'),
    ),
    Promote: unary(
      promoteRpc,
      (request) => handlers.promote(request),
      log,
      where,
      rules?.nodeOrAdmin('promote'),
    ),
    RenewLease: unary(
      renewLeaseRpc,
      (request) => handlers.renewLease(request),
      log,
      where,
      rules?.node('renewLease'),
    ),
    Checksum: unary(
      checksumRpc,
      (request) => handlers.checksum(request),
      log,
      where,
      rules?.nodeOrAdmin('checksum'),
    ),
    Repair: unary(
      repairRpc,
      (request) => handlers.repair(request),
      log,
      where,
      rules?.nodeOrAdmin('repair'),
    ),
    Resolve: unary(
      resolveRpc,
      async (request) => {
        await handlers.resolve(request)
        return undefined
      },
      log,
      where,
      rules?.nodeOrAdmin('resolve'),
    ),
    SyncComplete: unary(
      syncCompleteRpc,
      async (request) => {
        await handlers.syncComplete(request)
        return undefined
      },
      log,
      where,
      rules?.node('syncComplete'),
    ),
    MoveBegin: unary(
      moveBeginRpc,
      async (request) => {
        await handlers.moveBegin(request)
        return undefined
      },
      log,
      where,
      rules?.node('moveBegin'),
    ),
    MoveWrite: unary(
      moveWriteRpc,
      async ({ xxh64: sent, ...request }) => {
        if (!request.hole && xxh64(request.data) !== sent) {
          const where = `${request.length} bytes at ${request.offset} of ${request.volume}`
          throw new DuplexError(
            'CHECKSUM_MISMATCH',
            `moved copy of ${where} failed its xxh64 check`,
          )
        }
        await handlers.moveWrite(request)
        return undefined
      },
      log,
      where,
      rules?.node('moveWrite'),
    ),
    MoveAdopt: unary(
      moveAdoptRpc,
      (request) => handlers.moveAdopt(request),
      log,
      where,
      rules?.node('moveAdopt'),
    ),
    MoveCutover: unary(
      moveCutoverRpc,
      (request) => handlers.moveCutover(request),
      log,
      where,
      rules?.node('moveCutover'),
    ),
    MoveFinish: unary(
      moveFinishRpc,
      (request) => handlers.moveFinish(request),
      log,
      where,
      rules?.node('moveFinish'),
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
  private readonly client: UnaryClient

  constructor(
    private readonly address: string,
    private readonly options: PeerControlClientOptions = {},
  ) {
    this.client = new UnaryClient(address, {
      ...(options.credentials === undefined ? {} : { credentials: options.credentials }),
      channelOptions: { ...clientChannelOptions, ...options.channelOptions },
      deadlineMs: options.deadlineMs ?? peerControlDeadlineMsDefault,
      what: 'peer',
    })
  }

  /**
   * The peer's replica of `volume`. One it does not hold reads as
   * `{ exists: false, epoch: 0, primary: '', state: 'Inconsistent', sizeBytes: 0 }`.
   */
  describe(volume: string, deadlineMs?: number): Promise<DescribeReply> {
    return this.client.invoke(describeRpc, { volume }, deadlineMs)
  }

  /** Run an NBD request on the peer; a READ resolves with exactly `length` verified bytes. */
  async forward(request: ForwardRequest, deadlineMs?: number): Promise<ForwardReply> {
    assertNoProblem(forwardRequestProblem(request), 'forward request')
    const deadline = this.client.deadline(deadlineMs)
    const xxh64 = await loadXxh64()
    let failure = ''
    for (let attempt = 0; attempt <= forwardChecksumRetriesMax; attempt++) {
      const bytes = this.forwardBytes(request, xxh64)
      const answer = await this.client.exchange(forwardRpc, bytes, deadline)
      if (!answer.ok) {
        if (answer.code !== 'CHECKSUM_MISMATCH')
          throw remoteError(answer.code, answer.message, 'peer')
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
    return this.client.invoke(handoverRpc, request, deadlineMs)
  }

  promote(request: PromoteRequest, deadlineMs?: number): Promise<PromoteReply> {
    return this.client.invoke(promoteRpc, request, deadlineMs)
  }

  syncComplete(request: SyncCompleteRequest, deadlineMs?: number): Promise<void> {
    return this.client.invoke(syncCompleteRpc, request, deadlineMs)
  }

  renewLease(request: RenewLeaseRequest, deadlineMs?: number): Promise<RenewLeaseReply> {
    return this.client.invoke(renewLeaseRpc, request, deadlineMs)
  }

  checksum(request: ChecksumRequest, deadlineMs?: number): Promise<ChecksumReply> {
    return this.client.invoke(checksumRpc, request, deadlineMs)
  }

  repair(request: RepairRequest, deadlineMs?: number): Promise<RepairReply> {
    return this.client.invoke(repairRpc, request, deadlineMs)
  }

  resolve(request: ResolveRequest, deadlineMs?: number): Promise<void> {
    return this.client.invoke(resolveRpc, request, deadlineMs)
  }

  moveBegin(request: MoveBeginRequest, deadlineMs?: number): Promise<void> {
    return this.client.invoke(moveBeginRpc, request, deadlineMs)
  }

  /** One piece of a moving replica; a payload that fails its checksum is sent again. */
  async moveWrite(request: MoveWriteRequest, deadlineMs?: number): Promise<void> {
    const xxh64 = await loadXxh64()
    const wire = { ...request, xxh64: request.hole ? 0n : xxh64(request.data) }
    for (let attempt = 0; ; attempt++) {
      try {
        await this.client.invoke(moveWriteRpc, wire, deadlineMs)
        return
      } catch (error) {
        const retry = error instanceof DuplexError && error.code === 'CHECKSUM_MISMATCH'
        if (!retry || attempt >= forwardChecksumRetriesMax) throw error
      }
    }
  }

  moveAdopt(request: MoveAdoptRequest, deadlineMs?: number): Promise<MoveAdoptReply> {
    return this.client.invoke(moveAdoptRpc, request, deadlineMs)
  }

  moveCutover(request: MoveCutoverRequest, deadlineMs?: number): Promise<MoveCutoverReply> {
    return this.client.invoke(moveCutoverRpc, request, deadlineMs)
  }

  moveFinish(request: MoveFinishRequest, deadlineMs?: number): Promise<MoveAdoptReply> {
    return this.client.invoke(moveFinishRpc, request, deadlineMs)
  }

  /** Close the channel; calls after this reject with SHUTTING_DOWN. */
  close(): void {
    this.client.close()
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
}

/** A forward reply must carry exactly the bytes its request asked for (none but for a READ). */
function checkForwardReply(request: ForwardRequest, data: Buffer, sum: bigint): void {
  if (request.kind === 'read') {
    if (data.length !== request.length) {
      throw malformedReply(`${data.length} bytes for a read of ${request.length}`, 'peer')
    }
  } else if (data.length !== 0 || sum !== 0n) {
    throw malformedReply(`data or xxh64 in the reply to a ${request.kind}`, 'peer')
  }
}
