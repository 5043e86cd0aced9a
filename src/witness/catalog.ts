/**
 * The cluster catalog, pure: domains, nodes and volumes, and the commands that change them. The
 * witness keeps it (witness-store.ts, one synced document per revision) and serves it over the
 * Admin service; nodes follow it (what to replicate, with whom) and admins change it through the
 * CLI. ARCHITECTURE.md "Placement and catalog".
 *
 * `applyCatalogCommand` validates a command against the current catalog and either returns the
 * next catalog (revision + 1; unchanged, same revision, when the command changes nothing, so a
 * retried command is harmless) or refuses with a code and a sentence that says what to do. It
 * never throws for bad input. New volumes are placed by src/placement (two data domains, the
 * witness in a third); nodes the witness has not heard from lately (`down`) receive nothing.
 */
import { formatEndpoint } from '../core/endpoints.js'
import type { ErrorCode } from '../core/errors.js'
import { DuplexError, isDuplexError } from '../core/errors.js'
import { formatSize } from '../core/units.js'
import { addressPatternProblem, parseReachableEndpoint } from '../daemon/cluster-config.js'
import type { OnLostQuorum } from '../daemon/cluster-config.js'
import { place } from '../placement/placement.js'
import type { ClusterView, DomainKind, PlacementRequest } from '../placement/placement.js'
import { validateVolumeName, validateVolumeSize } from '../replica/store.js'

export interface CatalogDomain {
  name: string
  kind: DomainKind
}

/** `active` receives replicas; `draining` keeps its replicas until they move, receives none. */
export type CatalogNodeState = 'active' | 'draining'

export interface CatalogNode {
  name: string
  domain: string
  /** HOST:PORT its peers replicate to. */
  replication: string
  /** HOST:PORT hypervisors reach its NBD server at ('' until the node registers). */
  nbd: string
  /** Set by the admin (0: use what the node reports). */
  capacityBytes: number
  /** What the node reported at registration: its data directory's file system size. */
  reportedCapacityBytes: number
  state: CatalogNodeState
}

export interface CatalogVolume {
  name: string
  sizeBytes: number
  /** Where the primary should run ('' none). */
  preferredDomain: string
  /** The nodes with its two replicas, in two data domains. */
  replicas: [string, string]
  /** The node that starts as primary (replicas[0]); the witness's record says who leads now. */
  primary: string
  onLostQuorum: OnLostQuorum
  /** Bytes per second a resync may copy (0: unlimited). */
  resyncRateBytes: number
  followTheWriter: boolean
  /**
   * A replica move under way (`duplex volume move`, `node drain`): the replica on `moveFrom` is
   * being copied to `moveTo` ('' and '': none). The nodes carry it out; the witness completes it
   * (`completeMove`) in the same durable write that records the new pair.
   */
  moveFrom: string
  moveTo: string
  /** Who may open it over NBD: TLS certificate common names, and addresses or CIDR blocks. */
  allowClients: string[]
  allowAddresses: string[]
}

export interface Catalog {
  /** Counts changes; nodes ask for the catalog newer than the revision they hold. */
  revision: number
  domains: CatalogDomain[]
  nodes: CatalogNode[]
  volumes: CatalogVolume[]
}

export const emptyCatalog: Catalog = { revision: 0, domains: [], nodes: [], volumes: [] }

/** Names of domains, nodes and volumes: one rule for all (store.ts volume names). */
export const catalogEntriesMax = 10_000

export type CatalogCommand =
  | { type: 'addDomain'; name: string; kind: DomainKind }
  | { type: 'removeDomain'; name: string }
  | {
      type: 'addNode'
      name: string
      domain: string
      replication: string
      capacityBytes?: number | undefined
    }
  | { type: 'removeNode'; name: string }
  /** From the node daemon itself when it starts: where clients reach it, how much it holds. */
  | { type: 'registerNode'; name: string; nbd: string; capacityBytes: number }
  | {
      type: 'createVolume'
      name: string
      sizeBytes: number
      preferredDomain?: string | undefined
      onLostQuorum?: OnLostQuorum | undefined
      resyncRateBytes?: number | undefined
      followTheWriter?: boolean | undefined
      allowClients?: string[] | undefined
      allowAddresses?: string[] | undefined
    }
  /** Replace a volume's access lists (empty lists: open to every client). */
  | { type: 'setVolumeAccess'; name: string; allowClients: string[]; allowAddresses: string[] }
  | { type: 'resizeVolume'; name: string; sizeBytes: number }
  | { type: 'deleteVolume'; name: string }
  /** Rebuild the replica on `fromNode` on another node of its domain (`toNode`, or placement's). */
  | { type: 'moveVolume'; name: string; fromNode: string; toNode?: string | undefined }
  /** Stop a move that has not completed (the copy on the target is deleted). */
  | { type: 'cancelMove'; name: string }
  /** The node receives no more replicas, and every replica on it moves within its domain. */
  | { type: 'drainNode'; name: string }
  /** The witness only, with the record of the new pair: the move is done. */
  | { type: 'completeMove'; name: string; fromNode: string; toNode: string }

export type CatalogResult =
  { ok: true; catalog: Catalog; changed: boolean } | { ok: false; code: ErrorCode; message: string }

/** What the catalog needs to know from outside: nodes whose lease at the witness lapsed. */
export interface CatalogContext {
  down: ReadonlySet<string>
}

export function applyCatalogCommand(
  catalog: Catalog,
  command: CatalogCommand,
  context: CatalogContext,
): CatalogResult {
  try {
    const next = apply(catalog, command, context)
    if (next === catalog) return { ok: true, catalog, changed: false }
    return { ok: true, catalog: { ...next, revision: catalog.revision + 1 }, changed: true }
  } catch (error) {
    if (isDuplexError(error)) return { ok: false, code: error.code, message: error.message }
    throw error
  }
}

/** The capacity placement counts for a node: the admin's, else the node's own report. */
export function nodeCapacity(node: CatalogNode): number {
  return node.capacityBytes > 0 ? node.capacityBytes : node.reportedCapacityBytes
}

/** The catalog as placement sees it; `down` nodes (and unregistered ones) receive nothing. */
export function placementView(catalog: Catalog, context: CatalogContext): ClusterView {
  return {
    domains: catalog.domains,
    nodes: catalog.nodes.map((node) => ({
      name: node.name,
      domain: node.domain,
      capacityBytes: nodeCapacity(node),
      state:
        node.state === 'draining'
          ? 'draining'
          : context.down.has(node.name) || node.nbd === ''
            ? 'down'
            : 'active',
    })),
    volumes: catalog.volumes.map((volume) => ({
      name: volume.name,
      sizeBytes: volume.sizeBytes,
      replicas: volume.replicas,
      ...(volume.moveTo === '' ? {} : { incoming: volume.moveTo }),
    })),
  }
}

/**
 * The cluster file's JSON form (cluster-config.ts) of the catalog: what a node following the
 * witness runs, validated by the same parser as a hand-written file.
 */
export function clusterJsonOf(catalog: Catalog, witness: string): unknown {
  return {
    witness,
    nodes: catalog.nodes.map((node) => ({
      name: node.name,
      domain: node.domain,
      replication: node.replication,
    })),
    volumes: catalog.volumes.map((volume) => ({
      name: volume.name,
      size: volume.sizeBytes,
      replicas: volume.replicas,
      primary: volume.primary,
      followTheWriter: volume.followTheWriter,
      onLostQuorum: volume.onLostQuorum,
      ...(volume.resyncRateBytes > 0 ? { resyncRate: volume.resyncRateBytes } : {}),
      ...(volume.moveTo === '' ? {} : { move: { from: volume.moveFrom, to: volume.moveTo } }),
      ...(volume.allowClients.length + volume.allowAddresses.length === 0
        ? {}
        : { access: { clients: volume.allowClients, addresses: volume.allowAddresses } }),
    })),
  }
}

function apply(catalog: Catalog, command: CatalogCommand, context: CatalogContext): Catalog {
  switch (command.type) {
    case 'addDomain':
      return addDomain(catalog, command)
    case 'removeDomain':
      return removeDomain(catalog, command.name)
    case 'addNode':
      return addNode(catalog, command)
    case 'removeNode':
      return removeNode(catalog, command.name)
    case 'registerNode':
      return registerNode(catalog, command)
    case 'createVolume':
      return createVolume(catalog, command, context)
    case 'resizeVolume':
      return resizeVolume(catalog, command, context)
    case 'deleteVolume':
      return deleteVolume(catalog, command.name)
    case 'moveVolume':
      return moveVolume(catalog, command, context)
    case 'cancelMove':
      return cancelMove(catalog, command.name)
    case 'drainNode':
      return drainNode(catalog, command.name, context)
    case 'completeMove':
      return completeMove(catalog, command)
    case 'setVolumeAccess':
      return setVolumeAccess(catalog, command)
  }
}

function refuse(code: ErrorCode, message: string): never {
  throw new DuplexError(code, message)
}

function checkName(name: string, what: string): void {
  try {
    validateVolumeName(name)
  } catch {
    refuse(
      'INVALID_ARGUMENT',
      `${what} name ${JSON.stringify(name)} is not valid: use 1-64 characters from a-z, 0-9, ` +
        `'.', '_' and '-', starting with a letter or a digit`,
    )
  }
}

function checkRoom(count: number, what: string): void {
  if (count >= catalogEntriesMax) {
    refuse('FAILED_PRECONDITION', `the catalog holds ${catalogEntriesMax} ${what}, its limit`)
  }
}

function addDomain(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'addDomain' }>,
): Catalog {
  checkName(command.name, 'domain')
  const existing = catalog.domains.find((domain) => domain.name === command.name)
  if (existing !== undefined) {
    if (existing.kind === command.kind) return catalog
    refuse('ALREADY_EXISTS', `domain ${command.name} exists already, as a ${existing.kind} domain`)
  }
  checkRoom(catalog.domains.length, 'domains')
  return { ...catalog, domains: [...catalog.domains, { name: command.name, kind: command.kind }] }
}

function removeDomain(catalog: Catalog, name: string): Catalog {
  if (!catalog.domains.some((domain) => domain.name === name)) {
    refuse('NOT_FOUND', `there is no domain ${name}`)
  }
  const nodes = catalog.nodes.filter((node) => node.domain === name)
  if (nodes.length > 0) {
    refuse(
      'FAILED_PRECONDITION',
      `domain ${name} still has nodes (${nodes.map((node) => node.name).join(', ')}); ` +
        `drain and remove them first: duplex node remove NODE`,
    )
  }
  const domain = catalog.domains.find((each) => each.name === name)
  if (domain?.kind === 'witness' && catalog.volumes.length > 0) {
    const others = catalog.domains.filter((each) => each.kind === 'witness' && each.name !== name)
    if (others.length === 0) {
      refuse(
        'FAILED_PRECONDITION',
        `domain ${name} is the witness domain of ${catalog.volumes.length} volume(s); ` +
          `without it no site can fail over`,
      )
    }
  }
  return { ...catalog, domains: catalog.domains.filter((each) => each.name !== name) }
}

function addNode(catalog: Catalog, command: Extract<CatalogCommand, { type: 'addNode' }>): Catalog {
  checkName(command.name, 'node')
  const domain = catalog.domains.find((each) => each.name === command.domain)
  if (domain === undefined) {
    const known = catalog.domains.map((each) => each.name).join(', ') || 'none yet'
    refuse(
      'NOT_FOUND',
      `there is no domain ${command.domain} (domains: ${known}); add it first: ` +
        `duplex domain add ${command.domain} --kind data`,
    )
  }
  if (domain.kind !== 'data') {
    refuse(
      'INVALID_ARGUMENT',
      `${command.domain} is a witness domain; storage nodes go to data domains`,
    )
  }
  const endpoint = parseReachableEndpoint(command.replication, 'replication address')
  const replication = formatEndpoint(endpoint.host, endpoint.port)
  const capacityBytes = command.capacityBytes ?? 0
  if (!Number.isSafeInteger(capacityBytes) || capacityBytes < 0) {
    refuse('INVALID_ARGUMENT', `capacity must be a number of bytes, not ${capacityBytes}`)
  }
  const existing = catalog.nodes.find((node) => node.name === command.name)
  if (existing !== undefined) {
    if (
      existing.domain === command.domain &&
      existing.replication === replication &&
      (command.capacityBytes === undefined || existing.capacityBytes === capacityBytes)
    ) {
      return catalog
    }
    refuse(
      'ALREADY_EXISTS',
      `node ${command.name} exists already (domain ${existing.domain}, replication ${existing.replication})`,
    )
  }
  const sameEndpoint = catalog.nodes.find(
    (node) => node.replication.toLowerCase() === replication.toLowerCase(),
  )
  if (sameEndpoint !== undefined) {
    refuse(
      'ALREADY_EXISTS',
      `node ${sameEndpoint.name} already replicates at ${replication}; each node needs its own address`,
    )
  }
  checkRoom(catalog.nodes.length, 'nodes')
  const node: CatalogNode = {
    name: command.name,
    domain: command.domain,
    replication,
    nbd: '',
    capacityBytes,
    reportedCapacityBytes: 0,
    state: 'active',
  }
  return { ...catalog, nodes: [...catalog.nodes, node] }
}

function removeNode(catalog: Catalog, name: string): Catalog {
  if (!catalog.nodes.some((node) => node.name === name)) {
    refuse('NOT_FOUND', `there is no node ${name}`)
  }
  const held = catalog.volumes.filter(
    (volume) => volume.replicas.includes(name) || volume.moveTo === name,
  )
  if (held.length > 0) {
    refuse(
      'FAILED_PRECONDITION',
      `node ${name} holds replicas of ${held.map((volume) => volume.name).join(', ')}; ` +
        `move them first (duplex node drain ${name}) or delete those volumes`,
    )
  }
  return { ...catalog, nodes: catalog.nodes.filter((node) => node.name !== name) }
}

function registerNode(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'registerNode' }>,
): Catalog {
  const node = catalog.nodes.find((each) => each.name === command.name)
  if (node === undefined) {
    refuse(
      'NOT_FOUND',
      `node ${command.name} is not in the catalog; an admin adds it: ` +
        `duplex node add ${command.name} --domain DOMAIN --address HOST:PORT`,
    )
  }
  const endpoint = parseReachableEndpoint(command.nbd, 'NBD address')
  const nbd = formatEndpoint(endpoint.host, endpoint.port)
  if (!Number.isSafeInteger(command.capacityBytes) || command.capacityBytes < 0) {
    refuse('INVALID_ARGUMENT', `capacity must be a number of bytes, not ${command.capacityBytes}`)
  }
  if (node.nbd === nbd && node.reportedCapacityBytes === command.capacityBytes) return catalog
  return replaceNode(catalog, { ...node, nbd, reportedCapacityBytes: command.capacityBytes })
}

function replaceNode(catalog: Catalog, node: CatalogNode): Catalog {
  return {
    ...catalog,
    nodes: catalog.nodes.map((each) => (each.name === node.name ? node : each)),
  }
}

function createVolume(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'createVolume' }>,
  context: CatalogContext,
): Catalog {
  validateVolumeName(command.name)
  validateVolumeSize(command.sizeBytes)
  const onLostQuorum = command.onLostQuorum ?? 'error'
  const resyncRateBytes = command.resyncRateBytes ?? 0
  if (!Number.isSafeInteger(resyncRateBytes) || resyncRateBytes < 0) {
    refuse('INVALID_ARGUMENT', `resync rate must be bytes per second, not ${resyncRateBytes}`)
  }
  const existing = catalog.volumes.find((volume) => volume.name === command.name)
  if (existing !== undefined) {
    if (existing.sizeBytes === command.sizeBytes) return catalog
    refuse(
      'VOLUME_EXISTS',
      `volume ${command.name} exists already (${formatSize(existing.sizeBytes)}); ` +
        `to grow it: duplex volume resize ${command.name} --size SIZE`,
    )
  }
  checkRoom(catalog.volumes.length, 'volumes')
  const request: PlacementRequest = {
    type: 'create',
    volume: command.name,
    sizeBytes: command.sizeBytes,
    preferredDomain: command.preferredDomain,
  }
  const result = place(placementView(catalog, context), request)
  if (!result.ok) refuse('FAILED_PRECONDITION', `cannot place ${command.name}: ${result.reason}`)
  const { plan } = result
  if (plan.type !== 'create') return refuse('IO_ERROR', 'placement answered with another plan')
  const volume: CatalogVolume = {
    name: command.name,
    sizeBytes: command.sizeBytes,
    preferredDomain: command.preferredDomain ?? '',
    replicas: [plan.replicas[0], plan.replicas[1]],
    primary: plan.replicas[0],
    onLostQuorum,
    resyncRateBytes,
    followTheWriter: command.followTheWriter ?? false,
    moveFrom: '',
    moveTo: '',
    ...checkedAccess(command.allowClients ?? [], command.allowAddresses ?? []),
  }
  return { ...catalog, volumes: [...catalog.volumes, volume] }
}

function resizeVolume(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'resizeVolume' }>,
  context: CatalogContext,
): Catalog {
  const volume = catalog.volumes.find((each) => each.name === command.name)
  if (volume === undefined) refuse('VOLUME_NOT_FOUND', `there is no volume ${command.name}`)
  validateVolumeSize(command.sizeBytes)
  if (volume.sizeBytes === command.sizeBytes) return catalog
  if (volume.moveTo !== '') {
    refuse(
      'FAILED_PRECONDITION',
      `${volume.name} is moving from ${volume.moveFrom} to ${volume.moveTo}; resize it once the move completed`,
    )
  }
  const result = place(placementView(catalog, context), {
    type: 'resize',
    volume: command.name,
    sizeBytes: command.sizeBytes,
  })
  if (!result.ok) refuse('FAILED_PRECONDITION', `cannot resize ${command.name}: ${result.reason}`)
  // Each node grows its replica once no client has it open there (replication.ts growReplica).
  return replaceVolume(catalog, { ...volume, sizeBytes: command.sizeBytes })
}

function deleteVolume(catalog: Catalog, name: string): Catalog {
  if (!catalog.volumes.some((volume) => volume.name === name)) {
    refuse('VOLUME_NOT_FOUND', `there is no volume ${name}`)
  }
  return { ...catalog, volumes: catalog.volumes.filter((volume) => volume.name !== name) }
}

function findVolume(catalog: Catalog, name: string): CatalogVolume {
  const volume = catalog.volumes.find((each) => each.name === name)
  return volume ?? refuse('VOLUME_NOT_FOUND', `there is no volume ${name}`)
}

function replaceVolume(catalog: Catalog, volume: CatalogVolume): Catalog {
  return {
    ...catalog,
    volumes: catalog.volumes.map((each) => (each.name === volume.name ? volume : each)),
  }
}

function moveVolume(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'moveVolume' }>,
  context: CatalogContext,
): Catalog {
  const volume = findVolume(catalog, command.name)
  const { fromNode, toNode } = command
  if (volume.moveTo !== '') {
    if (volume.moveFrom === fromNode && (toNode === undefined || toNode === volume.moveTo)) {
      return catalog // asked again
    }
    refuse(
      'FAILED_PRECONDITION',
      `${volume.name} is moving from ${volume.moveFrom} to ${volume.moveTo} already; ` +
        `wait for it, or stop it: duplex volume move ${volume.name} --cancel`,
    )
  }
  const result = place(placementView(catalog, context), {
    type: 'move',
    volume: volume.name,
    fromNode,
    toNode,
  })
  if (!result.ok) refuse('FAILED_PRECONDITION', `cannot move ${volume.name}: ${result.reason}`)
  const [planned] = result.plan.type === 'moves' ? result.plan.moves : []
  if (planned === undefined) return refuse('IO_ERROR', 'placement answered with another plan')
  return replaceVolume(catalog, { ...volume, moveFrom: fromNode, moveTo: planned.toNode })
}

function cancelMove(catalog: Catalog, name: string): Catalog {
  const volume = findVolume(catalog, name)
  if (volume.moveTo === '') return catalog
  const from = catalog.nodes.find((node) => node.name === volume.moveFrom)
  if (from?.state === 'draining') {
    refuse(
      'FAILED_PRECONDITION',
      `${volume.moveFrom} is draining: its replicas must move (remove the node from the ` +
        `catalog only once it holds none)`,
    )
  }
  return replaceVolume(catalog, { ...volume, moveFrom: '', moveTo: '' })
}

function drainNode(catalog: Catalog, name: string, context: CatalogContext): Catalog {
  const node = catalog.nodes.find((each) => each.name === name)
  if (node === undefined) refuse('NOT_FOUND', `there is no node ${name}`)
  // Moves already under way away from the node stay as they are: plan as if they were done.
  const view = placementView(catalog, context)
  const settled: ClusterView = {
    ...view,
    volumes: catalog.volumes.map((volume) => ({
      name: volume.name,
      sizeBytes: volume.sizeBytes,
      replicas:
        volume.moveFrom === name
          ? [
              volume.replicas[0] === name ? volume.moveTo : volume.replicas[0],
              volume.replicas[1] === name ? volume.moveTo : volume.replicas[1],
            ]
          : volume.replicas,
      ...(volume.moveTo === '' || volume.moveFrom === name ? {} : { incoming: volume.moveTo }),
    })),
  }
  const blocked = catalog.volumes.filter(
    (volume) =>
      volume.moveTo === name ||
      (volume.replicas.includes(name) && volume.moveTo !== '' && volume.moveFrom !== name),
  )
  if (blocked.length > 0) {
    refuse(
      'FAILED_PRECONDITION',
      `${name} takes part in moves under way (${blocked.map((v) => v.name).join(', ')}); ` +
        `drain it once those complete`,
    )
  }
  const result = place(settled, { type: 'drain', node: name })
  if (!result.ok) refuse('FAILED_PRECONDITION', result.reason)
  const moves = result.plan.type === 'moves' ? result.plan.moves : []
  if (node.state === 'draining' && moves.length === 0) return catalog
  let next = replaceNode(catalog, { ...node, state: 'draining' })
  for (const move of moves) {
    next = replaceVolume(next, {
      ...findVolume(next, move.volume),
      moveFrom: move.fromNode,
      moveTo: move.toNode,
    })
  }
  return next
}

function completeMove(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'completeMove' }>,
): Catalog {
  const volume = findVolume(catalog, command.name)
  const { fromNode, toNode } = command
  if (volume.replicas.includes(toNode) && !volume.replicas.includes(fromNode)) return catalog
  if (volume.moveFrom !== fromNode || volume.moveTo !== toNode) {
    refuse(
      'FAILED_PRECONDITION',
      `the catalog does not move ${volume.name}'s replica from ${fromNode} to ${toNode}` +
        (volume.moveTo === '' ? '' : ` (it moves from ${volume.moveFrom} to ${volume.moveTo})`),
    )
  }
  const swap = (node: string): string => (node === fromNode ? toNode : node)
  return replaceVolume(catalog, {
    ...volume,
    replicas: [swap(volume.replicas[0]), swap(volume.replicas[1])],
    primary: swap(volume.primary),
    moveFrom: '',
    moveTo: '',
  })
}

/** Access lists as the catalog keeps them: checked, without repeats, sorted. */
function checkedAccess(
  clients: readonly string[],
  addresses: readonly string[],
): { allowClients: string[]; allowAddresses: string[] } {
  for (const client of clients) {
    if (client === '' || Buffer.byteLength(client) > 253) {
      refuse(
        'INVALID_ARGUMENT',
        `a client name is a certificate's common name, not ${JSON.stringify(client)}`,
      )
    }
  }
  for (const address of addresses) {
    const problem = addressPatternProblem(address)
    if (problem !== undefined) refuse('INVALID_ARGUMENT', problem)
  }
  if (clients.length + addresses.length > 256) {
    refuse('INVALID_ARGUMENT', 'at most 256 entries in the access lists of a volume')
  }
  return {
    allowClients: [...new Set(clients)].sort(),
    allowAddresses: [...new Set(addresses)].sort(),
  }
}

function setVolumeAccess(
  catalog: Catalog,
  command: Extract<CatalogCommand, { type: 'setVolumeAccess' }>,
): Catalog {
  const volume = findVolume(catalog, command.name)
  const access = checkedAccess(command.allowClients, command.allowAddresses)
  if (
    JSON.stringify(access) ===
    JSON.stringify({ allowClients: volume.allowClients, allowAddresses: volume.allowAddresses })
  ) {
    return catalog
  }
  return replaceVolume(catalog, { ...volume, ...access })
}
