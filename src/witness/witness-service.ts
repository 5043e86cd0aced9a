/**
 * The Witness gRPC service (proto/duplex/v1/witness.proto): `addWitnessService` serves a
 * witness's `WitnessHandlers`; `WitnessClient` calls them. Like peer-control.ts this is a codec
 * edge on src/core/unary-rpc.ts: every field from the other side is decoded and checked here
 * (names bounded, exactly two distinct replicas, safe-integer epochs, a sound lease timing), so
 * the arbiter and the nodes only ever see well-formed values.
 */
import type * as grpc from '@grpc/grpc-js'
import type { Logger } from '../core/log.js'
import {
  fail,
  failOn,
  firstProblem,
  loadProto,
  method,
  nameProblem,
  readBool,
  readName,
  readNames,
  readRepeated,
  readU64,
  rpc as unaryRpc,
  uintProblem,
  unary,
  UnaryClient,
} from '../core/unary-rpc.js'
import type { Caller, Fields, Problem, Rpc, RpcCodec } from '../core/unary-rpc.js'
import { requireNode, requireRole } from '../core/authorization.js'
import type {
  GrantRequest,
  HandoverGrantRequest,
  ReplaceRequest,
  ReportRequest,
  VolumeRecord,
} from './arbiter.js'
import { leaseTimingProblem } from './lease.js'
import type { LeaseTiming } from './lease.js'

/** Volumes (or leases) in one reply; a witness serving more must page (not needed yet). */
export const witnessListMax = 65_536
/** A node's call to the witness gives up after this (it is retried by the next heartbeat). */
export const witnessDeadlineMsDefault = 2000

export interface HeartbeatAnswer {
  timing: LeaseTiming
  volumes: VolumeRecord[]
}

export interface WitnessStatus {
  volumes: VolumeRecord[]
  leases: { node: string; remainingMs: number }[]
  quietMs: number
  timing: LeaseTiming
}

/** What a witness implements; a thrown DuplexError reaches the caller with its code. */
export interface WitnessHandlers {
  heartbeat(node: string): Promise<HeartbeatAnswer>
  report(request: ReportRequest): Promise<VolumeRecord>
  degrade(request: GrantRequest): Promise<VolumeRecord>
  takeover(request: GrantRequest): Promise<VolumeRecord>
  recordHandover(request: HandoverGrantRequest): Promise<VolumeRecord>
  replaceReplica(request: ReplaceRequest): Promise<VolumeRecord>
  status(): Promise<WitnessStatus>
}

// ---------------------------------------------------------------------------------------------
// Checks (both directions)

function pairProblem(replicas: readonly string[]): Problem {
  if (replicas.length !== 2) return `${replicas.length} replicas, not 2`
  if (replicas[0] === replicas[1]) return `both replicas on ${replicas[0]}`
  return firstProblem(...replicas.map((name, i) => nameProblem(name, `replicas[${i}]`)))
}

function recordProblem(record: VolumeRecord): Problem {
  return firstProblem(
    nameProblem(record.volume, 'volume'),
    pairProblem(record.replicas),
    uintProblem(record.epoch, 'epoch'),
    nameProblem(record.owner, 'owner'),
    record.replicas.includes(record.owner) ? undefined : `owner ${record.owner} holds no replica`,
  )
}

function grantRequestProblem(request: GrantRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.node, 'node'),
    uintProblem(request.epoch, 'epoch'),
  )
}

function reportProblem(request: ReportRequest): Problem {
  return firstProblem(
    grantRequestProblem(request),
    pairProblem(request.replicas),
    nameProblem(request.primary, 'primary'),
  )
}

function handoverProblem(request: HandoverGrantRequest): Problem {
  return firstProblem(
    nameProblem(request.volume, 'volume'),
    nameProblem(request.fromNode, 'fromNode'),
    nameProblem(request.toNode, 'toNode'),
    uintProblem(request.epoch, 'epoch'),
  )
}

function replaceProblem(request: ReplaceRequest): Problem {
  return firstProblem(
    grantRequestProblem(request),
    nameProblem(request.fromNode, 'fromNode'),
    nameProblem(request.toNode, 'toNode'),
  )
}

function listProblem(length: number, name: string): Problem {
  return length > witnessListMax ? `more than ${witnessListMax} ${name}` : undefined
}

// ---------------------------------------------------------------------------------------------
// Readers and writers

function readPair(message: Fields, name: string): readonly [string, string] {
  const names = readNames(message, name, 2)
  failOn(pairProblem(names))
  return [names[0] ?? '', names[1] ?? '']
}

function readRecord(message: Fields): VolumeRecord {
  const record = {
    volume: readName(message, 'volume'),
    replicas: readPair(message, 'replicas'),
    epoch: readU64(message, 'epoch'),
    owner: readName(message, 'owner'),
    inSync: readBool(message, 'inSync'),
  }
  failOn(recordProblem(record))
  return record
}

function readRecordField(message: Fields, name: string): VolumeRecord {
  const value = message[name]
  if (typeof value !== 'object' || value === null) return fail(`${name} missing`)
  return readRecord(value as Fields)
}

function writeRecord(record: VolumeRecord): Fields {
  return { ...record, replicas: [...record.replicas] }
}

function readTiming(message: Fields): LeaseTiming {
  const value = message['timing']
  if (typeof value !== 'object' || value === null) return fail('timing missing')
  const fields = value as Fields
  const driftRatio = fields['driftRatio']
  if (typeof driftRatio !== 'number') return fail('driftRatio is not a number')
  const timing = {
    leaseMs: readU64(fields, 'leaseMs'),
    driftRatio,
    marginMs: readU64(fields, 'marginMs'),
  }
  failOn(leaseTimingProblem(timing))
  return timing
}

function readGrantRequest(message: Fields): GrantRequest {
  return {
    volume: readName(message, 'volume'),
    node: readName(message, 'node'),
    epoch: readU64(message, 'epoch'),
  }
}

const recordReply = {
  replyProblem: recordProblem,
  writeReply: (record: VolumeRecord) => ({ record: writeRecord(record) }),
  readReply: (message: Fields) => readRecordField(message, 'record'),
}

const grantCodec: RpcCodec<GrantRequest, VolumeRecord> = {
  requestProblem: grantRequestProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: readGrantRequest,
  ...recordReply,
}

// ---------------------------------------------------------------------------------------------
// The calls

const root = loadProto('duplex/v1/witness.proto')

function rpc<Request, Reply>(name: string, codec: RpcCodec<Request, Reply>): Rpc<Request, Reply> {
  return unaryRpc(root, 'duplex.v1.Witness', name, codec)
}

const heartbeatRpc = rpc<{ node: string }, HeartbeatAnswer>('Heartbeat', {
  requestProblem: (request) => nameProblem(request.node, 'node'),
  writeRequest: (request) => ({ node: request.node }),
  readRequest: (message) => ({ node: readName(message, 'node') }),
  replyProblem: (reply) =>
    firstProblem(
      leaseTimingProblem(reply.timing),
      listProblem(reply.volumes.length, 'volumes'),
      ...reply.volumes.map(recordProblem),
    ),
  writeReply: (reply) => ({ timing: reply.timing, volumes: reply.volumes.map(writeRecord) }),
  readReply: (message) => ({
    timing: readTiming(message),
    volumes: readRepeated(message, 'volumes', witnessListMax, readRecord),
  }),
})

const reportRpc = rpc<ReportRequest, VolumeRecord>('Report', {
  requestProblem: reportProblem,
  writeRequest: (request) => ({ ...request, replicas: [...request.replicas] }),
  readRequest: (message) => ({
    ...readGrantRequest(message),
    replicas: readPair(message, 'replicas'),
    primary: readName(message, 'primary'),
    inSync: readBool(message, 'inSync'),
  }),
  ...recordReply,
})

const degradeRpc = rpc('Degrade', grantCodec)
const takeoverRpc = rpc('Takeover', grantCodec)

const recordHandoverRpc = rpc<HandoverGrantRequest, VolumeRecord>('RecordHandover', {
  requestProblem: handoverProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    fromNode: readName(message, 'fromNode'),
    toNode: readName(message, 'toNode'),
    epoch: readU64(message, 'epoch'),
  }),
  ...recordReply,
})

const replaceReplicaRpc = rpc<ReplaceRequest, VolumeRecord>('ReplaceReplica', {
  requestProblem: replaceProblem,
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => ({
    volume: readName(message, 'volume'),
    node: readName(message, 'node'),
    epoch: readU64(message, 'epoch'),
    fromNode: readName(message, 'fromNode'),
    toNode: readName(message, 'toNode'),
  }),
  ...recordReply,
})

const statusRpc = rpc<Record<string, never>, WitnessStatus>('Status', {
  requestProblem: () => undefined,
  writeRequest: () => ({}),
  readRequest: () => ({}),
  replyProblem: (reply) =>
    firstProblem(
      listProblem(reply.volumes.length, 'volumes'),
      listProblem(reply.leases.length, 'leases'),
      ...reply.volumes.map(recordProblem),
      ...reply.leases.map((lease) =>
        firstProblem(
          nameProblem(lease.node, 'node'),
          uintProblem(lease.remainingMs, 'remainingMs'),
        ),
      ),
      uintProblem(reply.quietMs, 'quietMs'),
      leaseTimingProblem(reply.timing),
    ),
  writeReply: (reply) => ({
    volumes: reply.volumes.map(writeRecord),
    leases: reply.leases,
    quietMs: reply.quietMs,
    timing: reply.timing,
  }),
  readReply: (message) => ({
    volumes: readRepeated(message, 'volumes', witnessListMax, readRecord),
    leases: readRepeated(message, 'leases', witnessListMax, (lease) => ({
      node: readName(lease, 'node'),
      remainingMs: readU64(lease, 'remainingMs'),
    })),
    quietMs: readU64(message, 'quietMs'),
    timing: readTiming(message),
  }),
})

/** The Witness service over raw bytes (our codecs decode); tests build hostile clients on it. */
export const witnessService: grpc.ServiceDefinition = {
  Heartbeat: method(heartbeatRpc),
  Report: method(reportRpc),
  Degrade: method(degradeRpc),
  Takeover: method(takeoverRpc),
  RecordHandover: method(recordHandoverRpc),
  ReplaceReplica: method(replaceReplicaRpc),
  Status: method(statusRpc),
}

/**
 * Who may call the witness under cluster TLS: a node speaks only for itself (the certificate's
 * name is the request's node; for a handover, the owner that hands over), so no node can ask for
 * another's lease or grant; `Status` is for nodes and admins.
 */
export const witnessRules = {
  heartbeat: ({ node }: { node: string }, caller: Caller) => {
    requireNode(caller, node, 'renew a lease')
  },
  asSender: (action: string) => (request: { node: string }, caller: Caller) => {
    requireNode(caller, request.node, action)
  },
  handover: (request: HandoverGrantRequest, caller: Caller) => {
    requireNode(caller, request.fromNode, 'record a handover')
  },
  status: (_request: unknown, caller: Caller) => {
    requireRole(caller, ['node', 'admin'], 'read the witness status')
  },
}

/**
 * Adds the Witness service to a grpc.Server (before bindAsync). `secure`: the server runs cluster
 * TLS, so every call is checked against the caller's certificate (witnessRules).
 */
export function addWitnessService(
  server: grpc.Server,
  handlers: WitnessHandlers,
  log: Logger,
  secure = false,
): void {
  const where = 'the witness'
  const rules = secure ? witnessRules : undefined
  server.addService(witnessService, {
    Heartbeat: unary(
      heartbeatRpc,
      ({ node }) => handlers.heartbeat(node),
      log,
      where,
      rules?.heartbeat,
    ),
    Report: unary(
      reportRpc,
      (request) => handlers.report(request),
      log,
      where,
      rules?.asSender('report a volume'),
    ),
    Degrade: unary(
      degradeRpc,
      (request) => handlers.degrade(request),
      log,
      where,
      rules?.asSender('ask to degrade'),
    ),
    Takeover: unary(
      takeoverRpc,
      (request) => handlers.takeover(request),
      log,
      where,
      rules?.asSender('ask to take over'),
    ),
    RecordHandover: unary(
      recordHandoverRpc,
      (request) => handlers.recordHandover(request),
      log,
      where,
      rules?.handover,
    ),
    ReplaceReplica: unary(
      replaceReplicaRpc,
      (request) => handlers.replaceReplica(request),
      log,
      where,
      rules?.asSender('replace a replica'),
    ),
    Status: unary(statusRpc, () => handlers.status(), log, where, rules?.status),
  })
}

export interface WitnessClientOptions {
  credentials?: grpc.ChannelCredentials
  deadlineMs?: number
}

const channelOptions: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': 1000,
  'grpc.keepalive_timeout_ms': 1000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
  'grpc.enable_retries': 0,
}

/** Server options matching the client's keepalive pings. */
export const witnessServerOptions: grpc.ServerOptions = {
  'grpc.keepalive_time_ms': 1000,
  'grpc.keepalive_timeout_ms': 1000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 500,
}

/** Calls one witness. */
export class WitnessClient {
  private readonly client: UnaryClient

  constructor(
    readonly address: string,
    options: WitnessClientOptions = {},
  ) {
    this.client = new UnaryClient(address, {
      ...(options.credentials === undefined ? {} : { credentials: options.credentials }),
      channelOptions,
      deadlineMs: options.deadlineMs ?? witnessDeadlineMsDefault,
      what: 'witness',
    })
  }

  heartbeat(node: string, deadlineMs?: number): Promise<HeartbeatAnswer> {
    return this.client.invoke(heartbeatRpc, { node }, deadlineMs)
  }

  report(request: ReportRequest, deadlineMs?: number): Promise<VolumeRecord> {
    return this.client.invoke(reportRpc, request, deadlineMs)
  }

  degrade(request: GrantRequest, deadlineMs?: number): Promise<VolumeRecord> {
    return this.client.invoke(degradeRpc, request, deadlineMs)
  }

  takeover(request: GrantRequest, deadlineMs?: number): Promise<VolumeRecord> {
    return this.client.invoke(takeoverRpc, request, deadlineMs)
  }

  recordHandover(request: HandoverGrantRequest, deadlineMs?: number): Promise<VolumeRecord> {
    return this.client.invoke(recordHandoverRpc, request, deadlineMs)
  }

  replaceReplica(request: ReplaceRequest, deadlineMs?: number): Promise<VolumeRecord> {
    return this.client.invoke(replaceReplicaRpc, request, deadlineMs)
  }

  status(deadlineMs?: number): Promise<WitnessStatus> {
    return this.client.invoke(statusRpc, {}, deadlineMs)
  }

  close(): void {
    this.client.close()
  }
}

/** Why a volume record is unsound (undefined: it is sound); also checks what a store loads. */
export function volumeRecordProblem(record: VolumeRecord): Problem {
  return recordProblem(record)
}
