/**
 * The admin's view of the cluster: `duplex domain ...`, `duplex node add|list|show|remove`,
 * `duplex volume create|list|show|resize|delete` and `duplex status`, all through the witness's
 * Admin service (proto/duplex/v1/admin.proto). The witness validates and places; this module
 * turns arguments into commands and catalogs into tables or JSON.
 *
 * The witness is `--witness HOST:PORT`, else $DUPLEX_WITNESS, else the address a default
 * `duplex demo` uses (127.0.0.1:10815).
 */
import { nodeClientOptions, witnessClientOptions } from './credentials.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import { formatEpoch } from '../core/epochs.js'
import { formatSize, parseSize } from '../core/units.js'
import { parseClusterConfig, readClusterConfig } from '../daemon/cluster-config.js'
import type { ClusterConfig, OnLostQuorum } from '../daemon/cluster-config.js'
import type { DomainKind } from '../placement/placement.js'
import { PeerControlClient } from '../replica/peer-control.js'
import type { DescribeReply } from '../replica/peer-control.js'
import { AdminClient } from '../witness/admin-service.js'
import { hasTlsHint } from '../core/unary-rpc.js'
import type { ClusterStatus } from '../witness/admin-service.js'
import { clusterJsonOf, nodeCapacity } from '../witness/catalog.js'
import type { Catalog, CatalogCommand, CatalogVolume } from '../witness/catalog.js'
import { formatTable } from './output.js'

/** Where `duplex demo` (default --port 10809) runs its witness. */
export const defaultWitness = '127.0.0.1:10815'

export type Output = 'table' | 'json'

/** Where the CLI learns the cluster: the witness's catalog, or a cluster file. */
export interface ClusterSource {
  witness: string
  clusterFile?: string | undefined
}

/** The cluster as the node-facing commands need it (addresses, replicas). */
export async function loadCluster(source: ClusterSource): Promise<ClusterConfig> {
  if (source.clusterFile !== undefined) return readClusterConfig(source.clusterFile)
  const catalog = await withAdmin(source.witness, (admin) => admin.getCatalog())
  if (catalog.nodes.length === 0) {
    throw new DuplexError(
      'FAILED_PRECONDITION',
      `the catalog at ${source.witness} has no nodes yet; add some: duplex node add NAME --domain DOMAIN --address HOST:PORT`,
    )
  }
  return parseClusterConfig(
    clusterJsonOf(catalog, source.witness),
    `the catalog at ${source.witness}`,
  )
}

async function withAdmin<T>(witness: string, work: (admin: AdminClient) => Promise<T>): Promise<T> {
  const admin = new AdminClient(witness, witnessClientOptions())
  try {
    return await work(admin)
  } catch (error) {
    if (error instanceof DuplexError && error.code === 'UNAVAILABLE') {
      const advice = hasTlsHint(error.message)
        ? ''
        : '; is it running? Name it with --witness HOST:PORT or DUPLEX_WITNESS'
      throw new DuplexError(
        'UNAVAILABLE',
        `cannot reach the witness at ${witness} (${error.message})${advice}`,
      )
    }
    throw error
  } finally {
    admin.close()
  }
}

async function change(witness: string, command: CatalogCommand): Promise<Catalog> {
  const answer = await withAdmin(witness, (admin) => admin.change(command))
  return answer.catalog
}

function print(output: Output, json: unknown, table: () => string): void {
  process.stdout.write(output === 'json' ? JSON.stringify(json, null, 2) + '\n' : table())
}

// ---- domains

export async function addDomain(witness: string, name: string, kind: DomainKind): Promise<void> {
  await change(witness, { type: 'addDomain', name, kind })
  process.stdout.write(`domain ${name} (${kind})\n`)
}

export async function removeDomain(witness: string, name: string): Promise<void> {
  await change(witness, { type: 'removeDomain', name })
  process.stdout.write(`removed domain ${name}\n`)
}

export async function listDomains(witness: string, output: Output): Promise<void> {
  const catalog = await withAdmin(witness, (admin) => admin.getCatalog())
  const rows = catalog.domains.map((domain) => ({
    ...domain,
    nodes: catalog.nodes.filter((node) => node.domain === domain.name).map((node) => node.name),
  }))
  print(output, rows, () =>
    formatTable(
      ['NAME', 'KIND', 'NODES'],
      rows.map((row) => [row.name, row.kind, row.nodes.join(', ') || '-']),
    ),
  )
}

// ---- nodes

export async function addNode(
  witness: string,
  name: string,
  options: { domain: string; address: string; capacity?: string | undefined },
): Promise<void> {
  const capacityBytes = options.capacity === undefined ? undefined : parseSize(options.capacity)
  await change(witness, {
    type: 'addNode',
    name,
    domain: options.domain,
    replication: options.address,
    capacityBytes,
  })
  process.stdout.write(
    `node ${name} in ${options.domain}, replicating at ${options.address}` +
      `${capacityBytes === undefined ? '' : `, ${formatSize(capacityBytes)}`}\n` +
      `Start it with: duplex node --name ${name} --witness ${witness} --data-dir DIR --listen HOST:PORT\n`,
  )
}

export async function removeNode(witness: string, name: string, yes: boolean): Promise<void> {
  if (!yes) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `removing node ${name} takes it out of the cluster; run again with --yes to confirm`,
    )
  }
  await change(witness, { type: 'removeNode', name })
  process.stdout.write(`removed node ${name}\n`)
}

interface NodeRow {
  name: string
  domain: string
  state: string
  up: boolean
  leaseRemainingMs: number
  replication: string
  nbd: string
  capacityBytes: number
  usedBytes: number
  replicas: string[]
}

function nodeRows(status: ClusterStatus): NodeRow[] {
  const { catalog } = status
  return catalog.nodes.map((node) => {
    const lease = status.leases.find((each) => each.node === node.name)?.remainingMs ?? 0
    const held = catalog.volumes.filter((volume) => volume.replicas.includes(node.name))
    return {
      name: node.name,
      domain: node.domain,
      state: node.state,
      up: lease > 0,
      leaseRemainingMs: lease,
      replication: node.replication,
      nbd: node.nbd,
      capacityBytes: nodeCapacity(node),
      usedBytes: held.reduce((sum, volume) => sum + volume.sizeBytes, 0),
      replicas: held.map((volume) => volume.name),
    }
  })
}

function nodeTable(rows: NodeRow[]): string {
  return formatTable(
    ['NAME', 'DOMAIN', 'STATE', 'UP', 'NBD', 'REPLICATION', 'USED', 'CAPACITY', 'VOLUMES'],
    rows.map((row) => [
      row.name,
      row.domain,
      row.state,
      row.up ? 'yes' : 'NO',
      row.nbd || '-',
      row.replication,
      formatSize(row.usedBytes),
      row.capacityBytes === 0 ? 'unknown' : formatSize(row.capacityBytes),
      String(row.replicas.length),
    ]),
  )
}

export async function listNodes(witness: string, output: Output): Promise<void> {
  const status = await withAdmin(witness, (admin) => admin.clusterStatus())
  const rows = nodeRows(status)
  print(output, rows, () => nodeTable(rows))
}

export async function showNode(witness: string, name: string, output: Output): Promise<void> {
  const status = await withAdmin(witness, (admin) => admin.clusterStatus())
  const row = nodeRows(status).find((each) => each.name === name)
  if (row === undefined) throw new DuplexError('NOT_FOUND', `there is no node ${name}`)
  print(output, row, () =>
    [
      `node:        ${row.name}`,
      `domain:      ${row.domain}`,
      `state:       ${row.state}`,
      `up:          ${row.up ? `yes (lease ${(row.leaseRemainingMs / 1000).toFixed(1)} s)` : 'NO: the witness has not heard from it within a lease'}`,
      `nbd:         ${row.nbd || '- (not registered yet: start the node)'}`,
      `replication: ${row.replication}`,
      `capacity:    ${row.capacityBytes === 0 ? 'unknown' : formatSize(row.capacityBytes)}, ${formatSize(row.usedBytes)} used`,
      `replicas:    ${row.replicas.join(', ') || '-'}`,
      '',
    ].join('\n'),
  )
}

// ---- volumes

export async function createCatalogVolume(
  witness: string,
  name: string,
  options: {
    size: string
    preferredDomain?: string | undefined
    onLostQuorum: OnLostQuorum
    resyncRate?: string | undefined
    followTheWriter: boolean
    allowClients?: string[] | undefined
    allowAddresses?: string[] | undefined
    wait?: boolean | undefined
  },
): Promise<void> {
  const catalog = await change(witness, {
    type: 'createVolume',
    allowClients: options.allowClients,
    allowAddresses: options.allowAddresses,
    name,
    sizeBytes: parseSize(options.size),
    preferredDomain: options.preferredDomain,
    onLostQuorum: options.onLostQuorum,
    resyncRateBytes: options.resyncRate === undefined ? 0 : parseSize(options.resyncRate),
    followTheWriter: options.followTheWriter,
  })
  const volume = catalog.volumes.find((each) => each.name === name)
  const where = (node: string): string => {
    const found = catalog.nodes.find((each) => each.name === node)
    return `${node} (${found?.domain ?? '?'})`
  }
  process.stdout.write(
    `volume ${name} (${formatSize(volume?.sizeBytes ?? 0)}) on ${volume?.replicas.map(where).join(' and ') ?? '?'}` +
      `, primary ${volume?.primary ?? '?'}\n`,
  )
  const primary = catalog.nodes.find((each) => each.name === volume?.primary)
  if (primary !== undefined && primary.nbd !== '') {
    process.stdout.write(`Serve it from nbd://${primary.nbd}/${name}\n`)
  }
  if (options.wait === true) await waitInSync(witness, name)
}

/** How long `--wait` waits for a volume to be in sync before it gives up (exit code 4). */
const waitTimeoutMs = 24 * 3600 * 1000

/**
 * `--wait`: until the witness records both replicas in sync, with the sync's progress on
 * stderr (a bar redrawn in place on a terminal, a line every 10 s otherwise).
 */
async function waitInSync(witness: string, name: string): Promise<void> {
  const started = Date.now()
  const tty = process.stderr.isTTY
  let lastLine = 0
  for (;;) {
    const status = await withAdmin(witness, (admin) => admin.clusterStatus())
    const [view] = await volumeViews(status, name)
    if (view === undefined) throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} is gone`)
    const seconds = Math.round((Date.now() - started) / 1000)
    if (view.inSync === true && progressOf(view) === undefined) {
      if (tty) process.stderr.write('\n')
      process.stdout.write(`${name}: both replicas in sync after ${seconds} s\n`)
      return
    }
    const sync = view.replicas.find((replica) => replica.sync !== undefined)?.sync
    const line = `${name}: ${syncOf(view)}, ${seconds} s`
    if (tty) {
      const width = 30
      const filled = sync === undefined ? 0 : Math.floor((sync.doneBytes / sync.totalBytes) * width)
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${line}   `)
    } else if (Date.now() - lastLine >= 10_000) {
      process.stderr.write(`${line}\n`)
      lastLine = Date.now()
    }
    if (Date.now() - started > waitTimeoutMs) {
      throw new DuplexError('UNAVAILABLE', `${name} was not in sync after ${seconds} s`)
    }
    await new Promise((resolve) => setTimeout(resolve, 500))
  }
}

export async function deleteCatalogVolume(
  witness: string,
  name: string,
  yes: boolean,
): Promise<void> {
  if (!yes) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `deleting volume ${name} destroys both replicas and their data; run again with --yes to confirm`,
    )
  }
  await change(witness, { type: 'deleteVolume', name })
  process.stdout.write(`deleted volume ${name}; its nodes free the space\n`)
}

/**
 * `duplex volume resize`: the catalog grows the volume; each node grows its replica once no
 * client has it open there (a client sized its view at its handshake). `--wait` waits until both
 * replicas have grown and are in sync again.
 */
export async function resizeCatalogVolume(
  witness: string,
  name: string,
  size: string,
  wait: boolean,
): Promise<void> {
  const sizeBytes = parseSize(size)
  await change(witness, { type: 'resizeVolume', name, sizeBytes })
  process.stdout.write(
    `volume ${name} is ${formatSize(sizeBytes)} in the catalog; each node grows its replica ` +
      `once no client has it open there, and clients see the new size when they connect again\n`,
  )
  if (!wait) return
  const started = Date.now()
  let told = false
  for (;;) {
    const status = await withAdmin(witness, (admin) => admin.clusterStatus())
    const [view] = await volumeViews(status, name)
    if (view === undefined) throw new DuplexError('VOLUME_NOT_FOUND', `volume ${name} is gone`)
    const grown = view.replicas.filter((replica) => replica.sizeBytes === sizeBytes)
    if (grown.length === view.replicas.length && view.inSync === true) {
      const seconds = Math.round((Date.now() - started) / 1000)
      process.stdout.write(
        `${name}: both replicas are ${formatSize(sizeBytes)} after ${seconds} s\n`,
      )
      return
    }
    if (!told && Date.now() - started > 5000) {
      const waiting = view.replicas.filter((replica) => replica.sizeBytes !== sizeBytes)
      process.stderr.write(
        `waiting for ${waiting.map((replica) => replica.node).join(' and ')}: ` +
          `disconnect the clients of ${name} there\n`,
      )
      told = true
    }
    if (Date.now() - started > waitTimeoutMs) {
      throw new DuplexError('UNAVAILABLE', `${name} has not grown on every node`)
    }
    await new Promise((resolve) => setTimeout(resolve, 500))
  }
}

/** `duplex volume access`: replaces the volume's access lists (`--open` clears them). */
export async function setVolumeAccess(
  witness: string,
  name: string,
  options: { allowClients: string[]; allowAddresses: string[]; open: boolean },
): Promise<void> {
  const none = options.allowClients.length + options.allowAddresses.length === 0
  if (none && !options.open) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      'name who may open the volume (--allow-client, --allow-address), or --open for everyone',
    )
  }
  if (!none && options.open) {
    throw new DuplexError('INVALID_ARGUMENT', '--open clears the lists; give it alone')
  }
  const catalog = await change(witness, {
    type: 'setVolumeAccess',
    name,
    allowClients: options.allowClients,
    allowAddresses: options.allowAddresses,
  })
  const volume = catalog.volumes.find((each) => each.name === name)
  const clients = volume?.allowClients.join(', ') || 'any'
  const addresses = volume?.allowAddresses.join(', ') || 'any'
  process.stdout.write(`${name}: clients ${clients}; addresses ${addresses}\n`)
}

/**
 * `duplex volume move`: rebuild one replica on another node of its site while the volume keeps
 * serving; the old replica is deleted once the new one is in the pair. `--cancel` stops a move.
 */
export async function moveCatalogVolume(
  witness: string,
  name: string,
  options: { from?: string | undefined; to?: string | undefined; cancel: boolean; wait: boolean },
): Promise<void> {
  if (options.cancel) {
    await change(witness, { type: 'cancelMove', name })
    process.stdout.write(`${name}: no move under way now; a partial copy is deleted\n`)
    return
  }
  if (options.from === undefined) {
    const catalog = await withAdmin(witness, (admin) => admin.getCatalog(0, 0))
    const volume = catalog.volumes.find((each) => each.name === name)
    if (volume === undefined)
      throw new DuplexError('VOLUME_NOT_FOUND', `there is no volume ${name}`)
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `name the replica to move: --from ${volume.replicas[0]} or --from ${volume.replicas[1]}`,
    )
  }
  const catalog = await change(witness, {
    type: 'moveVolume',
    name,
    fromNode: options.from,
    toNode: options.to,
  })
  const volume = catalog.volumes.find((each) => each.name === name)
  process.stdout.write(
    `${name}: moving the replica on ${volume?.moveFrom ?? options.from} to ${volume?.moveTo ?? '?'}; ` +
      `both replicas keep serving until the new one takes over\n`,
  )
  if (options.wait) await waitMoves(witness, (each) => each.name === name, `${name}'s move`)
}

/** `duplex node drain`: every replica on the node moves to other nodes of its site. */
export async function drainNode(witness: string, name: string, wait: boolean): Promise<void> {
  const before = await withAdmin(witness, (admin) => admin.getCatalog(0, 0))
  const catalog = await change(witness, { type: 'drainNode', name })
  const moving = catalog.volumes.filter((volume) => volume.moveFrom === name)
  const fresh = moving.filter(
    (volume) => before.volumes.find((each) => each.name === volume.name)?.moveTo === '',
  )
  process.stdout.write(
    `${name} is draining: it receives no new replicas` +
      (moving.length === 0
        ? ' and holds none\n'
        : `; moving ${moving.map((v) => `${v.name} to ${v.moveTo}`).join(', ')}` +
          (fresh.length < moving.length
            ? ` (${moving.length - fresh.length} under way already)`
            : '') +
          '\n'),
  )
  if (wait) {
    await waitMoves(witness, (volume) => volume.moveFrom === name, `draining ${name}`)
    process.stdout.write(
      `${name} holds no replicas; remove it with: duplex node remove ${name} --yes\n`,
    )
  }
}

/**
 * `--wait` for moves: until no volume `selected` is moving, with the copies' progress on stderr
 * (as `waitInSync`). A move the catalog cancelled also ends the wait.
 */
async function waitMoves(
  witness: string,
  selected: (volume: CatalogVolume) => boolean,
  what: string,
): Promise<void> {
  const started = Date.now()
  const tty = process.stderr.isTTY
  let lastLine = 0
  for (;;) {
    const status = await withAdmin(witness, (admin) => admin.clusterStatus())
    const moving = status.catalog.volumes.filter(
      (volume) => volume.moveTo !== '' && selected(volume),
    )
    const seconds = Math.round((Date.now() - started) / 1000)
    if (moving.length === 0) {
      if (tty) process.stderr.write('\n')
      process.stdout.write(`${what}: done after ${seconds} s\n`)
      return
    }
    const views = await volumeViews(status)
    const progress = views.filter((view) => view.move !== undefined)
    const done = progress.reduce((sum, view) => sum + (view.move?.doneBytes ?? 0), 0)
    const total = progress.reduce((sum, view) => sum + (view.move?.totalBytes ?? 0), 0)
    const line = `${what}: ${moving.length} volume(s) moving, ${seconds} s`
    if (tty) {
      const width = 30
      const filled = total === 0 ? 0 : Math.floor((done / total) * width)
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${line}   `)
    } else if (Date.now() - lastLine >= 10_000) {
      process.stderr.write(`${line}\n`)
      lastLine = Date.now()
    }
    if (Date.now() - started > waitTimeoutMs) {
      throw new DuplexError('UNAVAILABLE', `${what} was not done after ${seconds} s`)
    }
    await new Promise((resolve) => setTimeout(resolve, 500))
  }
}

interface ReplicaView {
  node: string
  domain: string
  role: 'primary' | 'secondary' | 'unknown'
  state: string
  epoch: number | undefined
  /** Ran alone: its peer lacks writes until a resync. */
  dirty: boolean
  /** On a primary copying to its peer: bytes copied and to copy. */
  sync: { doneBytes: number; totalBytes: number } | undefined
  /** On a replica moving to another node: the copy's progress. */
  move: { doneBytes: number; totalBytes: number } | undefined
  /** The replica's size on its node (it lags the catalog after a resize until clients detach). */
  sizeBytes: number | undefined
  error: string | undefined
}

interface VolumeView {
  name: string
  sizeBytes: number
  onLostQuorum: OnLostQuorum
  preferredDomain: string
  /** The witness's record: who orders writes, in which epoch, and whether both hold them. */
  owner: string | undefined
  epoch: number | undefined
  inSync: boolean | undefined
  nbd: string[]
  replicas: ReplicaView[]
  /** A replica move under way: from, to, and the copy's progress (from the source's Describe). */
  move: { from: string; to: string; doneBytes: number; totalBytes: number } | undefined
}

async function describeReplicas(
  status: ClusterStatus,
  volume: CatalogVolume,
): Promise<ReplicaView[]> {
  return Promise.all(
    volume.replicas.map(async (name) => {
      const node = status.catalog.nodes.find((each) => each.name === name)
      const view: ReplicaView = {
        node: name,
        domain: node?.domain ?? '?',
        role: 'unknown',
        state: 'unreachable',
        epoch: undefined,
        dirty: false,
        sync: undefined,
        move: undefined,
        sizeBytes: undefined,
        error: undefined,
      }
      if (node === undefined) return view
      const client = new PeerControlClient(node.replication, nodeClientOptions(name))
      try {
        const reply: DescribeReply = await client.describe(volume.name, 3000)
        view.state = reply.exists ? reply.state : 'missing'
        if (reply.exists) view.sizeBytes = reply.sizeBytes
        view.epoch = reply.epoch
        view.dirty = reply.dirty
        if (reply.syncBytesTotal > 0) {
          view.sync = { doneBytes: reply.syncBytesDone, totalBytes: reply.syncBytesTotal }
        }
        if (reply.moveBytesTotal > 0) {
          view.move = { doneBytes: reply.moveBytesDone, totalBytes: reply.moveBytesTotal }
        }
        view.role = reply.epoch === 0 ? 'unknown' : reply.primary === name ? 'primary' : 'secondary'
      } catch (error) {
        view.error = errorMessage(error)
      } finally {
        client.close()
      }
      return view
    }),
  )
}

async function volumeViews(status: ClusterStatus, only?: string): Promise<VolumeView[]> {
  const volumes = status.catalog.volumes.filter(
    (volume) => only === undefined || volume.name === only,
  )
  return Promise.all(
    volumes.map(async (volume) => {
      const record = status.volumes.find((each) => each.volume === volume.name)
      const replicas = await describeReplicas(status, volume)
      const source = replicas.find((replica) => replica.node === volume.moveFrom)
      return {
        name: volume.name,
        sizeBytes: volume.sizeBytes,
        onLostQuorum: volume.onLostQuorum,
        preferredDomain: volume.preferredDomain,
        owner: record?.owner,
        epoch: record?.epoch,
        inSync: record?.inSync,
        nbd: volume.replicas.flatMap((name) => {
          const nbd = status.catalog.nodes.find((node) => node.name === name)?.nbd ?? ''
          return nbd === '' ? [] : [`nbd://${nbd}/${volume.name}`]
        }),
        replicas,
        move:
          volume.moveTo === ''
            ? undefined
            : {
                from: volume.moveFrom,
                to: volume.moveTo,
                doneBytes: source?.move?.doneBytes ?? 0,
                totalBytes: source?.move?.totalBytes ?? volume.sizeBytes,
              },
      }
    }),
  )
}

/** A running sync or resync, as "resyncing 42% (430.0 MiB of 1.0 GiB)". */
function progressOf(view: VolumeView): string | undefined {
  const sync = view.replicas.find((replica) => replica.sync !== undefined)?.sync
  if (sync === undefined) return undefined
  const percent = Math.floor((sync.doneBytes / sync.totalBytes) * 100)
  return `resyncing ${percent}% (${formatSize(sync.doneBytes)} of ${formatSize(sync.totalBytes)})`
}

function syncOf(view: VolumeView): string {
  const progress = progressOf(view)
  if (progress !== undefined) return progress
  if (view.move !== undefined) {
    const { from, to, doneBytes, totalBytes } = view.move
    const percent = totalBytes === 0 ? 0 : Math.floor((doneBytes / totalBytes) * 100)
    return `moving ${from}->${to} ${percent}%`
  }
  if (view.inSync === undefined) return 'not started'
  if (view.inSync) return 'in sync'
  const behind = view.replicas.find((replica) => replica.node !== view.owner)
  return behind?.state === 'Inconsistent' || behind?.state === 'Outdated'
    ? `degraded (${behind.node} ${behind.state})`
    : 'degraded'
}

function replicaCell(replica: ReplicaView): string {
  const role = replica.role === 'primary' ? '*' : ''
  return `${role}${replica.node}:${replica.state}${replica.dirty ? '+dirty' : ''}`
}

function volumeTable(views: VolumeView[]): string {
  return formatTable(
    ['NAME', 'SIZE', 'PRIMARY', 'EPOCH', 'SYNC', 'REPLICAS'],
    views.map((view) => [
      view.name,
      formatSize(view.sizeBytes),
      view.owner ?? '-',
      view.epoch === undefined ? '-' : formatEpoch(view.epoch),
      syncOf(view),
      view.replicas.map(replicaCell).join(' '),
    ]),
  )
}

export async function listCatalogVolumes(witness: string, output: Output): Promise<void> {
  const status = await withAdmin(witness, (admin) => admin.clusterStatus())
  const views = await volumeViews(status)
  print(output, views, () => volumeTable(views))
}

export async function showCatalogVolume(
  witness: string,
  name: string,
  output: Output,
): Promise<void> {
  const status = await withAdmin(witness, (admin) => admin.clusterStatus())
  const [view] = await volumeViews(status, name)
  if (view === undefined) throw new DuplexError('VOLUME_NOT_FOUND', `there is no volume ${name}`)
  print(output, view, () =>
    [
      `volume:         ${view.name}`,
      `size:           ${formatSize(view.sizeBytes)}`,
      `primary:        ${view.owner ?? '- (its nodes have not started it yet)'}`,
      `epoch:          ${view.epoch === undefined ? '-' : formatEpoch(view.epoch)}`,
      `sync:           ${syncOf(view)}`,
      `on-lost-quorum: ${view.onLostQuorum}`,
      `preferred site: ${view.preferredDomain || '-'}`,
      `served at:      ${view.nbd.join(' ') || '-'}`,
      '',
      formatTable(
        ['NODE', 'DOMAIN', 'ROLE', 'STATE', 'EPOCH', 'NOTE'],
        view.replicas.map((replica) => [
          replica.node,
          replica.domain,
          replica.role,
          replica.state,
          replica.epoch === undefined ? '-' : formatEpoch(replica.epoch),
          replica.error ?? (replica.dirty ? 'ran alone: its peer needs a resync' : ''),
        ]),
      ),
    ].join('\n'),
  )
}

// ---- status

/** What needs an admin first, most urgent first. */
function attention(status: ClusterStatus, nodes: NodeRow[], views: VolumeView[]): string[] {
  const items: string[] = []
  if (!status.catalog.domains.some((domain) => domain.kind === 'witness')) {
    items.push('no witness domain: add one in a third site (duplex domain add NAME --kind witness)')
  }
  for (const view of views) {
    if (view.replicas.every((replica) => replica.state !== 'UpToDate')) {
      items.push(`${view.name}: no replica is UpToDate reachable; I/O cannot be served`)
    } else if (view.inSync === false) {
      items.push(`${view.name}: degraded, one replica holds the only copy of recent writes`)
    }
  }
  for (const node of nodes) {
    if (!node.up) {
      items.push(
        `${node.name} (${node.domain}) is down or cannot reach the witness` +
          (node.replicas.length > 0 ? `; it holds ${node.replicas.join(', ')}` : ''),
      )
    }
  }
  if (status.quietMs > 0) {
    items.push(`the witness restarted; it grants nothing for ${Math.ceil(status.quietMs / 1000)} s`)
  }
  return items
}

export async function clusterStatus(witness: string, output: Output): Promise<void> {
  const status = await withAdmin(witness, (admin) => admin.clusterStatus())
  const nodes = nodeRows(status)
  const views = await volumeViews(status)
  const needs = attention(status, nodes, views)
  const witnessDomain = status.catalog.domains.find((domain) => domain.kind === 'witness')?.name
  print(
    output,
    {
      witness: { address: witness, domain: witnessDomain, revision: status.catalog.revision },
      attention: needs,
      nodes,
      volumes: views,
    },
    () =>
      [
        `witness ${witness}${witnessDomain === undefined ? '' : ` (${witnessDomain})`}, catalog revision ${status.catalog.revision}`,
        '',
        needs.length === 0 ? 'All volumes in sync, all nodes up.' : 'Needs attention:',
        ...needs.map((item) => `  - ${item}`),
        '',
        nodeTable(nodes),
        volumeTable(views),
      ].join('\n'),
  )
}
