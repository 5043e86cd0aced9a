/**
 * The Admin gRPC service (proto/duplex/v1/admin.proto): the catalog kept by the witness, changed
 * by admins and followed by nodes. `addAdminService` serves `AdminHandlers`; `AdminClient` calls
 * them. A codec edge on src/core/unary-rpc.ts like witness-service.ts: every field from the other
 * side is decoded and bounded here, so catalog.ts sees only well-formed commands (its own rules
 * then decide whether they make sense).
 */
import type * as grpc from '@grpc/grpc-js'
import { DuplexError } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import {
  assertNoProblem,
  decodeMessage,
  encodeMessage,
  enumToWire,
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
  readRequiredEnum,
  readEnum,
  readString,
  readU64,
  rpc as unaryRpc,
  textProblem,
  uintProblem,
  unary,
  UnaryClient,
} from '../core/unary-rpc.js'
import type { Caller, Fields, Problem, Rpc, RpcCodec } from '../core/unary-rpc.js'
import { requireNode, requireRole } from '../core/authorization.js'
import type { OnLostQuorum } from '../daemon/cluster-config.js'
import type { DomainKind } from '../placement/placement.js'
import type {
  Catalog,
  CatalogCommand,
  CatalogDomain,
  CatalogNode,
  CatalogNodeState,
  CatalogVolume,
} from './catalog.js'
import { catalogEntriesMax } from './catalog.js'

/** HOST:PORT text, bounded (hostnames are at most 253 bytes). */
const endpointBytesMax = 300
/** The longest a GetCatalog may wait for a newer revision. */
export const catalogWaitMsMax = 60_000

const domainKinds: readonly DomainKind[] = ['data', 'witness']
const nodeStates: readonly CatalogNodeState[] = ['active', 'draining']
const onLostQuorumValues: readonly OnLostQuorum[] = ['error', 'suspend']

export interface ChangeAnswer {
  catalog: Catalog
  changed: boolean
}

export interface ClusterStatus {
  catalog: Catalog
  volumes: { volume: string; epoch: number; owner: string; inSync: boolean }[]
  leases: { node: string; remainingMs: number }[]
  quietMs: number
}

/** What the witness implements; a thrown DuplexError reaches the caller with its code. */
export interface AdminHandlers {
  change(command: CatalogCommand): Promise<ChangeAnswer>
  getCatalog(afterRevision: number, waitMs: number): Promise<Catalog>
  clusterStatus(): Promise<ClusterStatus>
}

// ---------------------------------------------------------------------------------------------
// Catalog: checks, writers, readers

function endpointProblem(value: string, name: string, required: boolean): Problem {
  return textProblem(value, name, endpointBytesMax, required)
}

function catalogProblem(catalog: Catalog): Problem {
  return firstProblem(
    uintProblem(catalog.revision, 'revision'),
    catalog.domains.length > catalogEntriesMax ? 'too many domains' : undefined,
    catalog.nodes.length > catalogEntriesMax ? 'too many nodes' : undefined,
    catalog.volumes.length > catalogEntriesMax ? 'too many volumes' : undefined,
    ...catalog.domains.map((domain) => nameProblem(domain.name, 'domain')),
    ...catalog.nodes.map((node) =>
      firstProblem(
        nameProblem(node.name, 'node'),
        nameProblem(node.domain, 'node domain'),
        endpointProblem(node.replication, 'replication', true),
        endpointProblem(node.nbd, 'nbd', false),
        uintProblem(node.capacityBytes, 'capacityBytes'),
        uintProblem(node.reportedCapacityBytes, 'reportedCapacityBytes'),
      ),
    ),
    ...catalog.volumes.map((volume) =>
      firstProblem(
        nameProblem(volume.name, 'volume'),
        uintProblem(volume.sizeBytes, 'sizeBytes'),
        nameProblem(volume.preferredDomain, 'preferredDomain', false),
        ...volume.replicas.map((name) => nameProblem(name, 'replica')),
        nameProblem(volume.primary, 'primary'),
        uintProblem(volume.resyncRateBytes, 'resyncRateBytes'),
        nameProblem(volume.moveFrom, 'moveFrom', false),
        nameProblem(volume.moveTo, 'moveTo', false),
        (volume.moveFrom === '') !== (volume.moveTo === '') ? 'a move needs both ends' : undefined,
      ),
    ),
  )
}

function writeCatalog(catalog: Catalog): Fields {
  return {
    revision: catalog.revision,
    domains: catalog.domains.map((domain) => ({
      name: domain.name,
      kind: enumToWire(domainKinds, domain.kind),
    })),
    nodes: catalog.nodes.map((node) => ({
      ...node,
      state: enumToWire(nodeStates, node.state),
    })),
    volumes: catalog.volumes.map((volume) => ({
      ...volume,
      replicas: [...volume.replicas],
      onLostQuorum: enumToWire(onLostQuorumValues, volume.onLostQuorum),
    })),
  }
}

function readDomain(message: Fields): CatalogDomain {
  return { name: readName(message, 'name'), kind: readRequiredEnum(message, 'kind', domainKinds) }
}

function readEndpoint(message: Fields, name: string, required: boolean): string {
  const value = readString(message, name)
  failOn(endpointProblem(value, name, required))
  return value
}

function readNode(message: Fields): CatalogNode {
  return {
    name: readName(message, 'name'),
    domain: readName(message, 'domain'),
    replication: readEndpoint(message, 'replication', true),
    nbd: readEndpoint(message, 'nbd', false),
    capacityBytes: readU64(message, 'capacityBytes'),
    reportedCapacityBytes: readU64(message, 'reportedCapacityBytes'),
    state: readRequiredEnum(message, 'state', nodeStates),
  }
}

function readVolume(message: Fields): CatalogVolume {
  const replicas = readNames(message, 'replicas', 2)
  const [first, second] = replicas
  if (first === undefined || second === undefined) return fail('a volume needs two replicas')
  return {
    name: readName(message, 'name'),
    sizeBytes: readU64(message, 'sizeBytes'),
    preferredDomain: readName(message, 'preferredDomain', false),
    replicas: [first, second],
    primary: readName(message, 'primary'),
    onLostQuorum: readEnum(message, 'onLostQuorum', onLostQuorumValues) ?? 'error',
    resyncRateBytes: readU64(message, 'resyncRateBytes'),
    followTheWriter: readBool(message, 'followTheWriter'),
    moveFrom: readName(message, 'moveFrom', false),
    moveTo: readName(message, 'moveTo', false),
    allowClients: readStrings(message, 'allowClients'),
    allowAddresses: readStrings(message, 'allowAddresses'),
  }
}

/** Access list entries: at most 256 strings of at most 253 bytes. */
function readStrings(message: Fields, name: string): string[] {
  const value = message[name]
  if (value === undefined) return []
  if (!Array.isArray(value) || value.length > 256) return fail(`${name}: at most 256 entries`)
  return value.map((entry: unknown) => {
    if (typeof entry !== 'string' || Buffer.byteLength(entry) > 253) {
      return fail(`${name}: entries are strings of at most 253 bytes`)
    }
    return entry
  })
}

function readCatalog(message: Fields): Catalog {
  const value = message['catalog']
  if (typeof value !== 'object' || value === null) return fail('catalog missing')
  const fields = value as Fields
  return {
    revision: readU64(fields, 'revision'),
    domains: readRepeated(fields, 'domains', catalogEntriesMax, readDomain),
    nodes: readRepeated(fields, 'nodes', catalogEntriesMax, readNode),
    volumes: readRepeated(fields, 'volumes', catalogEntriesMax, readVolume),
  }
}

// ---------------------------------------------------------------------------------------------
// Commands

function commandProblem(command: CatalogCommand): Problem {
  const name = nameProblem(command.name, 'name')
  switch (command.type) {
    case 'addDomain':
    case 'removeDomain':
    case 'removeNode':
    case 'deleteVolume':
    case 'cancelMove':
    case 'drainNode':
      return name
    case 'setVolumeAccess':
      return firstProblem(
        name,
        command.allowClients.length + command.allowAddresses.length > 256
          ? 'at most 256 access entries'
          : undefined,
      )
    case 'moveVolume':
    case 'completeMove':
      return firstProblem(
        name,
        nameProblem(command.fromNode, 'fromNode'),
        nameProblem(command.toNode ?? '', 'toNode', false),
      )
    case 'addNode':
      return firstProblem(
        name,
        nameProblem(command.domain, 'domain'),
        endpointProblem(command.replication, 'replication', true),
        uintProblem(command.capacityBytes ?? 0, 'capacityBytes'),
      )
    case 'registerNode':
      return firstProblem(
        name,
        endpointProblem(command.nbd, 'nbd', true),
        uintProblem(command.capacityBytes, 'capacityBytes'),
      )
    case 'createVolume':
      return firstProblem(
        name,
        uintProblem(command.sizeBytes, 'sizeBytes'),
        nameProblem(command.preferredDomain ?? '', 'preferredDomain', false),
        uintProblem(command.resyncRateBytes ?? 0, 'resyncRateBytes'),
      )
    case 'resizeVolume':
      return firstProblem(name, uintProblem(command.sizeBytes, 'sizeBytes'))
  }
}

function writeCommand(command: CatalogCommand): Fields {
  switch (command.type) {
    case 'addDomain':
      return {
        addDomain: { name: command.name, kind: enumToWire(domainKinds, command.kind) },
      }
    case 'removeDomain':
      return { removeDomain: { name: command.name } }
    case 'addNode':
      return {
        addNode: {
          name: command.name,
          domain: command.domain,
          replication: command.replication,
          capacityBytes: command.capacityBytes ?? 0,
        },
      }
    case 'removeNode':
      return { removeNode: { name: command.name } }
    case 'registerNode':
      return {
        registerNode: {
          name: command.name,
          nbd: command.nbd,
          capacityBytes: command.capacityBytes,
        },
      }
    case 'createVolume':
      return {
        createVolume: {
          name: command.name,
          sizeBytes: command.sizeBytes,
          preferredDomain: command.preferredDomain ?? '',
          onLostQuorum: enumToWire(onLostQuorumValues, command.onLostQuorum ?? 'error'),
          resyncRateBytes: command.resyncRateBytes ?? 0,
          followTheWriter: command.followTheWriter ?? false,
          allowClients: command.allowClients ?? [],
          allowAddresses: command.allowAddresses ?? [],
        },
      }
    case 'setVolumeAccess':
      return {
        setVolumeAccess: {
          name: command.name,
          allowClients: command.allowClients,
          allowAddresses: command.allowAddresses,
        },
      }
    case 'resizeVolume':
      return { resizeVolume: { name: command.name, sizeBytes: command.sizeBytes } }
    case 'deleteVolume':
      return { deleteVolume: { name: command.name } }
    case 'moveVolume':
      return {
        moveVolume: {
          name: command.name,
          fromNode: command.fromNode,
          toNode: command.toNode ?? '',
        },
      }
    case 'cancelMove':
      return { cancelMove: { name: command.name } }
    case 'drainNode':
      return { drainNode: { name: command.name } }
    case 'completeMove':
      // Only the witness completes a move (with the record of the new pair), never a client.
      return assertNever('completeMove is not an admin command')
  }
}

function assertNever(why: string): never {
  throw new DuplexError('INVALID_ARGUMENT', why)
}

function member(message: Fields, name: string): Fields | undefined {
  const value = message[name]
  return typeof value === 'object' && value !== null ? (value as Fields) : undefined
}

function readCommand(message: Fields): CatalogCommand {
  const byName = (
    type: 'removeDomain' | 'removeNode' | 'deleteVolume' | 'cancelMove' | 'drainNode',
    fields: Fields,
  ) => ({
    type,
    name: readName(fields, 'name'),
  })
  let fields = member(message, 'addDomain')
  if (fields !== undefined) {
    return {
      type: 'addDomain',
      name: readName(fields, 'name'),
      kind: readRequiredEnum(fields, 'kind', domainKinds),
    }
  }
  fields = member(message, 'removeDomain')
  if (fields !== undefined) return byName('removeDomain', fields)
  fields = member(message, 'addNode')
  if (fields !== undefined) {
    const capacityBytes = readU64(fields, 'capacityBytes')
    return {
      type: 'addNode',
      name: readName(fields, 'name'),
      domain: readName(fields, 'domain'),
      replication: readEndpoint(fields, 'replication', true),
      ...(capacityBytes > 0 ? { capacityBytes } : {}),
    }
  }
  fields = member(message, 'removeNode')
  if (fields !== undefined) return byName('removeNode', fields)
  fields = member(message, 'registerNode')
  if (fields !== undefined) {
    return {
      type: 'registerNode',
      name: readName(fields, 'name'),
      nbd: readEndpoint(fields, 'nbd', true),
      capacityBytes: readU64(fields, 'capacityBytes'),
    }
  }
  fields = member(message, 'createVolume')
  if (fields !== undefined) {
    const preferredDomain = readName(fields, 'preferredDomain', false)
    return {
      type: 'createVolume',
      name: readName(fields, 'name'),
      sizeBytes: readU64(fields, 'sizeBytes'),
      ...(preferredDomain === '' ? {} : { preferredDomain }),
      onLostQuorum: readEnum(fields, 'onLostQuorum', onLostQuorumValues) ?? 'error',
      resyncRateBytes: readU64(fields, 'resyncRateBytes'),
      followTheWriter: readBool(fields, 'followTheWriter'),
      allowClients: readStrings(fields, 'allowClients'),
      allowAddresses: readStrings(fields, 'allowAddresses'),
    }
  }
  fields = member(message, 'setVolumeAccess')
  if (fields !== undefined) {
    return {
      type: 'setVolumeAccess',
      name: readName(fields, 'name'),
      allowClients: readStrings(fields, 'allowClients'),
      allowAddresses: readStrings(fields, 'allowAddresses'),
    }
  }
  fields = member(message, 'resizeVolume')
  if (fields !== undefined) {
    return {
      type: 'resizeVolume',
      name: readName(fields, 'name'),
      sizeBytes: readU64(fields, 'sizeBytes'),
    }
  }
  fields = member(message, 'deleteVolume')
  if (fields !== undefined) return byName('deleteVolume', fields)
  fields = member(message, 'moveVolume')
  if (fields !== undefined) {
    const toNode = readName(fields, 'toNode', false)
    return {
      type: 'moveVolume',
      name: readName(fields, 'name'),
      fromNode: readName(fields, 'fromNode'),
      ...(toNode === '' ? {} : { toNode }),
    }
  }
  fields = member(message, 'cancelMove')
  if (fields !== undefined) return byName('cancelMove', fields)
  fields = member(message, 'drainNode')
  if (fields !== undefined) return byName('drainNode', fields)
  return fail('no command')
}

// ---------------------------------------------------------------------------------------------
// The calls

const root = loadProto('duplex/v1/admin.proto')

function rpc<Request, Reply>(name: string, codec: RpcCodec<Request, Reply>): Rpc<Request, Reply> {
  return unaryRpc(root, 'duplex.v1.Admin', name, codec)
}

const changeRpc = rpc<CatalogCommand, ChangeAnswer>('Change', {
  requestProblem: commandProblem,
  writeRequest: writeCommand,
  readRequest: readCommand,
  replyProblem: (reply) => catalogProblem(reply.catalog),
  writeReply: (reply) => ({ catalog: writeCatalog(reply.catalog), changed: reply.changed }),
  readReply: (message) => ({
    catalog: readCatalog(message),
    changed: readBool(message, 'changed'),
  }),
})

const getCatalogRpc = rpc<{ afterRevision: number; waitMs: number }, Catalog>('GetCatalog', {
  requestProblem: (request) =>
    firstProblem(
      uintProblem(request.afterRevision, 'afterRevision'),
      uintProblem(request.waitMs, 'waitMs'),
      request.waitMs > catalogWaitMsMax ? `waitMs over ${catalogWaitMsMax}` : undefined,
    ),
  writeRequest: (request) => ({ ...request }),
  readRequest: (message) => {
    const waitMs = readU64(message, 'waitMs')
    if (waitMs > catalogWaitMsMax) fail(`waitMs over ${catalogWaitMsMax}`)
    return { afterRevision: readU64(message, 'afterRevision'), waitMs }
  },
  replyProblem: catalogProblem,
  writeReply: (catalog) => ({ catalog: writeCatalog(catalog) }),
  readReply: readCatalog,
})

const clusterStatusRpc = rpc<Record<string, never>, ClusterStatus>('ClusterStatus', {
  requestProblem: () => undefined,
  writeRequest: () => ({}),
  readRequest: () => ({}),
  replyProblem: (reply) =>
    firstProblem(
      catalogProblem(reply.catalog),
      reply.volumes.length > catalogEntriesMax ? 'too many volumes' : undefined,
      reply.leases.length > catalogEntriesMax ? 'too many leases' : undefined,
      ...reply.volumes.map((volume) =>
        firstProblem(
          nameProblem(volume.volume, 'volume'),
          uintProblem(volume.epoch, 'epoch'),
          nameProblem(volume.owner, 'owner'),
        ),
      ),
      ...reply.leases.map((lease) =>
        firstProblem(
          nameProblem(lease.node, 'node'),
          uintProblem(lease.remainingMs, 'remainingMs'),
        ),
      ),
      uintProblem(reply.quietMs, 'quietMs'),
    ),
  writeReply: (reply) => ({ ...reply, catalog: writeCatalog(reply.catalog) }),
  readReply: (message) => ({
    catalog: readCatalog(message),
    volumes: readRepeated(message, 'volumes', catalogEntriesMax, (volume) => ({
      volume: readName(volume, 'volume'),
      epoch: readU64(volume, 'epoch'),
      owner: readName(volume, 'owner'),
      inSync: readBool(volume, 'inSync'),
    })),
    leases: readRepeated(message, 'leases', catalogEntriesMax, (lease) => ({
      node: readName(lease, 'node'),
      remainingMs: readU64(lease, 'remainingMs'),
    })),
    quietMs: readU64(message, 'quietMs'),
  }),
})

/** The Admin service over raw bytes (our codecs decode); tests build hostile clients on it. */
export const adminService: grpc.ServiceDefinition = {
  Change: method(changeRpc),
  GetCatalog: method(getCatalogRpc),
  ClusterStatus: method(clusterStatusRpc),
}

const catalogType = root.lookupType('duplex.v1.Catalog')

/** The catalog as bytes (how the witness stores it). */
export function encodeCatalog(catalog: Catalog): Buffer {
  assertNoProblem(catalogProblem(catalog), 'catalog')
  return encodeMessage(catalogType, writeCatalog(catalog))
}

/** A stored catalog, checked as strictly as one from the wire (throws Malformed). */
export function decodeCatalog(bytes: Uint8Array): Catalog {
  return decodeMessage(catalogType, bytes, (message) => readCatalog({ catalog: message }))
}

/** Adds the Admin service to a grpc.Server (before bindAsync). */
/**
 * Who may use the catalog under cluster TLS: changes need an admin certificate, except that a
 * node registers itself (its certificate names it); nodes and admins read.
 */
export const adminRules = {
  change: (command: CatalogCommand, caller: Caller) => {
    if (command.type === 'registerNode' && caller.identity?.role === 'node') {
      requireNode(caller, command.name, 'register a node')
      return
    }
    requireRole(caller, ['admin'], `change the catalog (${command.type})`)
  },
  read: (_request: unknown, caller: Caller) => {
    requireRole(caller, ['admin', 'node'], 'read the catalog')
  },
}

/**
 * Adds the Admin service to a grpc.Server (before bindAsync). `secure`: the server runs cluster
 * TLS, so every call is checked against the caller's certificate (adminRules).
 */
export function addAdminService(
  server: grpc.Server,
  handlers: AdminHandlers,
  log: Logger,
  secure = false,
): void {
  const where = 'the witness'
  const rules = secure ? adminRules : undefined
  server.addService(adminService, {
    Change: unary(changeRpc, (command) => handlers.change(command), log, where, rules?.change),
    GetCatalog: unary(
      getCatalogRpc,
      ({ afterRevision, waitMs }) => handlers.getCatalog(afterRevision, waitMs),
      log,
      where,
      rules?.read,
    ),
    ClusterStatus: unary(clusterStatusRpc, () => handlers.clusterStatus(), log, where, rules?.read),
  })
}

/** Calls the Admin service of one witness. */
export class AdminClient {
  private readonly client: UnaryClient

  constructor(
    readonly address: string,
    options: { credentials?: grpc.ChannelCredentials; deadlineMs?: number } = {},
  ) {
    this.client = new UnaryClient(address, {
      ...(options.credentials === undefined ? {} : { credentials: options.credentials }),
      channelOptions: {
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1000,
        'grpc.enable_retries': 0,
      },
      deadlineMs: options.deadlineMs ?? 5000,
      what: 'witness',
    })
  }

  change(command: CatalogCommand, deadlineMs?: number): Promise<ChangeAnswer> {
    return this.client.invoke(changeRpc, command, deadlineMs)
  }

  /** With waitMs > 0 the call's deadline covers the wait. */
  getCatalog(afterRevision = 0, waitMs = 0): Promise<Catalog> {
    return this.client.invoke(getCatalogRpc, { afterRevision, waitMs }, waitMs + 5000)
  }

  clusterStatus(deadlineMs?: number): Promise<ClusterStatus> {
    return this.client.invoke(clusterStatusRpc, {}, deadlineMs)
  }

  close(): void {
    this.client.close()
  }
}
