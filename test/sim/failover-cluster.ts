/**
 * The whole failover path in one deterministic simulation: two nodes `a` and `b` holding one
 * volume, a witness `w`, and a client. Every decision is made by the REAL pure code:
 * - the write path: PrimaryReplication / SecondaryReplication (degraded mode, activity log);
 * - the replica's failover rules: `Failover` (peer leases, when to degrade, take over, probe,
 *   yield), `adoptWitnessRecord`, `learnedRecord`, `resyncPlan`, `judgeWitnessRecord`
 *   (src/replica/failover.ts);
 * - start-up roles: `decideRole` (roles.ts); generation histories and forks (history.ts);
 *   the dirty bitmap (`DirtyMap`);
 * - the witness: `Arbiter` with the node lease rules (src/witness/).
 * The drivers around them mirror ReplicaController, PrimaryVolume and WitnessSession: they only
 * move events and effects, on a simulated network (per-pair delays, FIFO streams that break,
 * cut links), disks with a page cache (a process crash keeps it, a power loss keeps a random
 * part of what was not flushed) and node clocks that drift within the lease rules' bound. A
 * client sends reads, writes (some FUA) and flushes to either node; a node that cannot serve one
 * forwards it to its peer.
 *
 * Faults from the seed: link cuts between any two sites and heals, a node's process killed
 * (restarted later), a node's power lost, both nodes' power lost, the witness killed and
 * restarted (it keeps what it made durable), and once per run an admin's forced promotion when a
 * site and the witness are lost. At the end every link heals, every process runs again, a split
 * brain is resolved by the admin (keeping the side that serves, else the forced one), and the
 * cluster must converge.
 *
 * Invariants, checked as the run goes and at the end (ARCHITECTURE.md "Invariants"):
 * - No acknowledged write lost, no stale read: every read, at either node, returns per block the
 *   newest write acknowledged before it started, or one it already returned, or a newer one.
 *   Exceptions, as on any disk (docs/failover.md "Power loss and unflushed writes"): a power
 *   loss may drop an acknowledged write that was not durable (FUA, or before an acknowledged
 *   FLUSH), and where it left the replicas different reads may differ until they agree again;
 *   a failed or lost write leaves its blocks undefined until the next acknowledged write. A
 *   durable write survives every power loss on at least one replica. An admin's forced
 *   promotion, and a resolve, reset all this to the kept replica (the admin accepted the loss);
 *   what the other side acknowledges or reads until it follows the kept lineage is the split
 *   brain the admin accepted.
 * - At most one writer per epoch; acknowledgements never go back to an older epoch; never two
 *   nodes allowed to acknowledge writes alone at once.
 * - At the end: both replicas UpToDate, paired, the witness records the volume in sync, and the
 *   replicas are identical and hold every acknowledged write.
 *
 * Negative controls (`Mutation`) break one rule each; failover.test.ts requires a seed that
 * passes as shipped to fail with the mutation.
 */
import { formatEpoch, generationOf, nextGeneration, nextTerm } from '../../src/core/epochs.js'
import { DirtyMap } from '../../src/replica/dirty-map.js'
import {
  adoptWitnessRecord,
  Failover,
  failoverTimingDefaults,
  judgeWitnessRecord,
  learnedRecord,
  resyncPlan,
} from '../../src/replica/failover.js'
import { describeFork, findFork, recordWithHistory } from '../../src/replica/history.js'
import { PrimaryReplication, SecondaryReplication } from '../../src/replica/replication.js'
import type {
  BlockOp,
  PrimaryEffect,
  ReplicationCode,
  SecondaryEffect,
} from '../../src/replica/replication.js'
import { decideRole } from '../../src/replica/roles.js'
import type { ReplicaRecord } from '../../src/replica/store.js'
import { Arbiter } from '../../src/witness/arbiter.js'
import type { Decision, VolumeRecord } from '../../src/witness/arbiter.js'
import { holderLeaseEnd, nodeLeaseDefaults } from '../../src/witness/lease.js'
import { Prng } from '../lib/prng.js'

export const blockBytes = 4096
export const blocks = 64
const sizeBytes = blocks * blockBytes
const extentBytes = 16 * blockBytes
const dirtyChunkBytes = 4 * blockBytes
const heartbeatMs = 500
const dirtyPersistMs = 500
const coolEveryMs = 1000
const connectRetryMs = 200
const bootstrapRetryMs = 500
const syncCopiesMax = 4

type Name = 'a' | 'b'
type Site = Name | 'w'
const names: readonly Name[] = ['a', 'b']

/** Deliberate bugs for the negative controls: the checks must catch each. */
export type Mutation =
  | 'none'
  /** Degraded writes are not marked in the dirty bitmap (the resync misses them). */
  | 'noDirty'
  /** A secondary serves reads without a valid peer lease (the primary may run alone). */
  | 'readsWithoutLease'

export interface FailoverSimConfig {
  seed: number
  horizonMs: number
  mutation: Mutation
  /** Fault events per second of simulated time. */
  faultRate: number
  forcedPromotions: boolean
}

export interface FailoverSimResult {
  violations: string[]
  trace: string[]
  stats: Record<string, number>
}

class Violation extends Error {}

interface Disk {
  cache: Int32Array
  durable: Int32Array
  unsynced: Set<number>
}

interface ClientOp {
  id: number
  kind: 'write' | 'read' | 'flush'
  block: number
  count: number
  version: number
  fua: boolean
  /** Reads: the floor per block of the range when the read started. Flushes: acked versions. */
  snapshot: Int32Array | undefined
  /** `FailoverSim.era` when it started: a power loss or a forced promotion lowers floors. */
  era: number
  forwarded: boolean
  done: boolean
}

interface Issued {
  op: ClientOp | undefined
  /** A sync copy: data read from the primary's disk when the core issues it. */
  copy: { block: number; count: number } | undefined
  data: number[] | undefined
}

interface Stream {
  id: number
  primary: Name
  secondary: Name
  open: boolean
  /** Per direction, the last delivery time (FIFO). */
  lastToSecondary: number
  lastToPrimary: number
}

interface PrimaryRole {
  type: 'primary'
  core: PrimaryReplication
  degraded: boolean
  forced: boolean
  issued: Map<number, Issued>
  flushes: Map<number, ClientOp | 'sync'>
  localInflight: number
  stream: Stream | undefined
  connecting: boolean
  peerIncarnation: number | undefined
  closed: boolean
}

interface SecondaryRole {
  type: 'secondary'
  core: SecondaryReplication
  expectedPrimary: Name
  stream: Stream | undefined
  payloads: Map<string, number[]>
  /** The primary said this replica is in sync in this epoch (SyncComplete): reads served here. */
  syncedEpoch: number | undefined
}

type Role = { type: 'none' } | PrimaryRole | SecondaryRole

type Message =
  | { type: 'op'; epoch: number; seq: number; op: BlockOp; data: number[] }
  | { type: 'flush'; epoch: number; flushId: number }
  | Exclude<SecondaryEffect, { type: 'writeLocal' } | { type: 'flushLocal' }>

interface DescribeReply {
  exists: true
  epoch: number
  primary: string
  state: ReplicaRecord['state']
  dirty: boolean
  history: ReplicaRecord['history']
  hot: number[]
  bootId: string
}

class Node {
  // durable
  record: ReplicaRecord
  readonly disk: Disk
  al = new Set<number>()
  dirtyBits: Uint8Array
  bootId = 1
  // process
  up = true
  incarnation = 1
  rate: number
  offset: number
  role: Role = { type: 'none' }
  failover = new Failover(failoverTimingDefaults)
  dirty: DirtyMap
  busy = false
  hotSyncPending = false
  peerBootIdInSync: string | undefined
  peerState: 'unknown' | 'syncing' | 'UpToDate' = 'unknown'
  checkingPeer = false
  lastPeerCheckAt = -Infinity
  quorumLost: string | undefined
  splitBrain: string | undefined
  witnessLeaseEnd = 0
  witnessKnown: VolumeRecord | undefined
  witnessReady = false
  witnessReport: boolean | undefined
  reporting = false
  nextRequest = 1
  /** Client ops handed off by a role change, issued again in the next role. */
  reissue: ClientOp[] = []

  constructor(
    readonly name: Name,
    readonly peer: Name,
    record: ReplicaRecord,
    rate: number,
    offset: number,
  ) {
    this.record = record
    this.rate = rate
    this.offset = offset
    this.disk = {
      cache: new Int32Array(blocks),
      durable: new Int32Array(blocks),
      unsynced: new Set(),
    }
    this.dirty = new DirtyMap(sizeBytes, dirtyChunkBytes)
    this.dirtyBits = this.dirty.takeChanges()
  }
}

export class FailoverSim {
  private readonly rng: Prng
  private real = 0
  private eventSeq = 0
  private readonly events: { at: number; seq: number; run: () => void }[] = []
  private readonly trace: string[] = []
  readonly stats: Record<string, number> = {}
  private readonly nodes: Record<Name, Node>
  private readonly cut = new Set<string>()
  // witness
  private arbiter: Arbiter
  private witnessUp = true
  private witnessDurable: VolumeRecord
  private readonly witnessRate: number
  private readonly witnessOffset: number
  private witnessIncarnation = 1
  // client and invariants
  private readonly floor = new Int32Array(blocks)
  /** Per block, the newest settled write a read returned (reads never go back from it). */
  private readonly readFloor = new Int32Array(blocks)
  /**
   * Blocks a power loss left different on the two replicas above their durable write: reads may
   * see either value until a resync makes them agree (see "Power loss" in docs/failover.md).
   */
  private readonly limbo = new Uint8Array(blocks)
  private readonly durableFloor = new Int32Array(blocks)
  private readonly writing = new Uint8Array(blocks)
  /**
   * Versions of writes not acknowledged: in flight, failed or lost with their connection. A
   * failed write leaves its range undefined until the next acknowledged write (as on any disk):
   * a read may return such a version without fixing it.
   */
  private readonly unsettled = new Set<number>()
  private readonly ackEpochs = new Map<number, Name>()
  private maxAckEpoch = 0
  private forcedOwner: Name | undefined
  /**
   * After a forced promotion, the other node until it follows the forced lineage (or an admin
   * resolves the split brain): what it acknowledges is the split brain the admin accepted.
   */
  private splitSide: Name | undefined
  private nextVersion = 1
  /** Counts the events that may lower the floors (power losses, forced promotions). */
  private era = 0
  private nextOp = 1
  private clientInflight = 0
  private clientOn = true
  private faultsOn = true
  private nextStream = 1

  constructor(readonly config: FailoverSimConfig) {
    this.rng = new Prng(config.seed)
    const drift = (): number => 1 + (this.rng.next() * 2 - 1) * 0.009
    const initial: ReplicaRecord = {
      epoch: 1_000_001,
      primary: 'a',
      state: 'UpToDate',
      history: [{ generation: 1, owner: 'a', forced: false }],
    }
    this.nodes = {
      a: new Node('a', 'b', initial, drift(), this.rng.int(1e6)),
      b: new Node('b', 'a', { ...initial }, drift(), this.rng.int(1e6)),
    }
    this.witnessDurable = {
      volume: 'v',
      replicas: ['a', 'b'],
      epoch: initial.epoch,
      owner: 'a',
      inSync: true,
    }
    this.witnessRate = drift()
    this.witnessOffset = this.rng.int(1e6)
    this.arbiter = this.newArbiter(-1e9)
  }

  run(): FailoverSimResult {
    const violations: string[] = []
    try {
      for (const node of names.map((name) => this.nodes[name])) this.startProcess(node)
      this.after(0, () => {
        this.clientTick()
      })
      this.after(500, () => {
        this.faultTick()
      })
      this.runUntil(this.config.horizonMs)
      this.endFaults()
      this.runUntil(this.real + 5000)
      this.clientOn = false
      this.converge()
    } catch (error) {
      if (!(error instanceof Violation)) throw error
      violations.push(error.message)
    }
    return { violations, trace: this.trace, stats: this.stats }
  }

  // ---- event loop

  private after(delayMs: number, run: () => void): void {
    const event = { at: this.real + delayMs, seq: this.eventSeq++, run }
    // Insert keeping (at, seq) order; queues stay short, so a binary search is enough.
    let low = 0
    let high = this.events.length
    while (low < high) {
      const mid = (low + high) >> 1
      const other = this.events[mid]
      if (
        other !== undefined &&
        (other.at < event.at || (other.at === event.at && other.seq < event.seq))
      ) {
        low = mid + 1
      } else high = mid
    }
    this.events.splice(low, 0, event)
  }

  /** After `localMs` of `node`'s clock, while the same process runs. */
  private onNode(node: Node, localMs: number, run: () => void): void {
    const incarnation = node.incarnation
    this.after(localMs / node.rate, () => {
      if (node.up && node.incarnation === incarnation) run()
    })
  }

  private runUntil(end: number): void {
    for (;;) {
      const event = this.events[0]
      if (event === undefined || event.at > end) break
      this.events.shift()
      this.real = event.at
      event.run()
      this.checkSoloWriters()
    }
    this.real = Math.max(this.real, end)
  }

  private local(node: Node): number {
    return node.offset + node.rate * this.real
  }

  private witnessNow(): number {
    return this.witnessOffset + this.witnessRate * this.real
  }

  private note(line: string): void {
    this.trace.push(`${this.real.toFixed(1)} ${line}`)
    if (this.trace.length > 400) this.trace.splice(0, 100)
  }

  private count(key: string, by = 1): void {
    this.stats[key] = (this.stats[key] ?? 0) + by
  }

  private fail(message: string): never {
    throw new Violation(`at ${this.real.toFixed(1)} ms: ${message}`)
  }

  // ---- network

  private linkKey(x: Site, y: Site): string {
    return x < y ? `${x}-${y}` : `${y}-${x}`
  }

  private linkUp(x: Site, y: Site): boolean {
    return !this.cut.has(this.linkKey(x, y))
  }

  private siteUp(site: Site): boolean {
    return site === 'w' ? this.witnessUp : this.nodes[site].up
  }

  private delay(): number {
    return this.rng.bool(0.03) ? 50 + this.rng.int(400) : 0.2 + this.rng.next() * 3
  }

  /**
   * A unary call from node `from` to `to`: `handle` runs there if the link and the target are up
   * (undefined: no answer), and the answer comes back the same way; otherwise `onFail` after
   * `timeoutMs` of the caller's clock.
   */
  private call<R>(
    from: Node,
    to: Site,
    handle: () => R | undefined,
    onReply: (reply: R) => void,
    onFail: () => void,
    timeoutMs = 1000,
  ): void {
    let settled = false
    const incarnation = from.incarnation
    const alive = (): boolean => from.up && from.incarnation === incarnation && !settled
    const targetIncarnation = to === 'w' ? this.witnessIncarnation : this.nodes[to].incarnation
    const sameTarget = (): boolean =>
      to === 'w'
        ? this.witnessIncarnation === targetIncarnation
        : this.nodes[to].incarnation === targetIncarnation
    if (this.linkUp(from.name, to)) {
      this.after(this.delay(), () => {
        if (!this.linkUp(from.name, to) || !this.siteUp(to)) return
        const reply = handle()
        if (reply === undefined) return
        this.after(this.delay(), () => {
          if (!this.linkUp(from.name, to) || !alive() || !sameTarget()) return
          settled = true
          onReply(reply)
        })
      })
    }
    this.onNode(from, timeoutMs, () => {
      if (settled) return
      settled = true
      onFail()
    })
  }

  private openStream(primary: Node, secondary: Node): Stream {
    return {
      id: this.nextStream++,
      primary: primary.name,
      secondary: secondary.name,
      open: true,
      lastToSecondary: 0,
      lastToPrimary: 0,
    }
  }

  private streamSend(stream: Stream, toSecondary: boolean, message: Message): void {
    if (!stream.open) return
    const at = Math.max(
      this.real + this.delay(),
      toSecondary ? stream.lastToSecondary : stream.lastToPrimary,
    )
    if (toSecondary) stream.lastToSecondary = at
    else stream.lastToPrimary = at
    this.after(at - this.real, () => {
      if (!stream.open) return
      if (toSecondary) this.secondaryReceive(this.nodes[stream.secondary], stream, message)
      else this.primaryReceive(this.nodes[stream.primary], stream, message)
    })
  }

  /** A stream breaks: messages in flight are lost, the primary's core hears of it. */
  private breakStream(stream: Stream | undefined): void {
    if (stream === undefined || !stream.open) return
    stream.open = false
    const primary = this.nodes[stream.primary]
    const role = primary.role
    if (role.type === 'primary' && role.stream === stream) {
      role.stream = undefined
      this.primaryEffects(primary, role, role.core.step({ type: 'peerDisconnected' }))
    }
  }

  private breakStreamsOf(site: Site): void {
    for (const node of names.map((name) => this.nodes[name])) {
      const role = node.role
      if (role.type !== 'primary' || role.stream === undefined) continue
      if (site === node.name || site === node.peer) this.breakStream(role.stream)
    }
  }

  // ---- disks

  private writeDisk(node: Node, block: number, data: readonly number[], fua: boolean): void {
    data.forEach((value, index) => {
      const at = block + index
      node.disk.cache[at] = value
      if (fua) {
        node.disk.durable[at] = value
        node.disk.unsynced.delete(at)
      } else node.disk.unsynced.add(at)
    })
  }

  private flushDisk(node: Node): void {
    for (const at of node.disk.unsynced) node.disk.durable[at] = node.disk.cache[at] ?? 0
    node.disk.unsynced.clear()
  }

  private readDisk(node: Node, block: number, count: number): number[] {
    return Array.from(node.disk.cache.subarray(block, block + count))
  }

  private ioDelay(): number {
    return 0.1 + this.rng.next() * (this.rng.bool(0.05) ? 20 : 2)
  }

  // ---- node processes

  private startProcess(node: Node): void {
    node.up = true
    node.role = { type: 'none' }
    node.failover = new Failover(failoverTimingDefaults)
    node.failover.roleStarted(this.local(node))
    node.dirty = new DirtyMap(sizeBytes, dirtyChunkBytes, node.dirtyBits.slice())
    node.busy = false
    node.hotSyncPending = false
    node.peerBootIdInSync = undefined
    node.peerState = 'unknown'
    node.checkingPeer = false
    node.lastPeerCheckAt = -Infinity
    node.quorumLost = undefined
    node.splitBrain = undefined
    node.witnessLeaseEnd = 0
    node.witnessKnown = undefined
    node.witnessReady = false
    node.witnessReport = undefined
    node.reporting = false
    node.reissue = []
    this.note(`${node.name} starts (${formatEpoch(node.record.epoch)} ${node.record.state})`)
    this.heartbeat(node)
    this.onNode(node, failoverTimingDefaults.tickMs, () => {
      this.tick(node)
    })
    this.onNode(node, dirtyPersistMs, () => {
      this.persistDirtyLoop(node)
    })
    this.onNode(node, coolEveryMs, () => {
      this.coolLoop(node)
    })
    // Wait for the witness (up to 2 s), adopt what it recorded, then decide the role.
    const started = this.local(node)
    const waitWitness = (): void => {
      if (!node.witnessReady && this.local(node) - started < 2000) {
        this.onNode(node, 100, waitWitness)
        return
      }
      this.bootstrap(node)
    }
    waitWitness()
  }

  private stopProcess(node: Node): void {
    const role = node.role
    if (role.type === 'primary') {
      role.closed = true
      this.breakStream(role.stream)
      for (const issued of role.issued.values()) if (issued.op !== undefined) this.lose(issued.op)
      for (const flush of role.flushes.values()) if (flush !== 'sync') this.lose(flush)
    }
    if (role.type === 'secondary') this.breakStream(role.stream)
    for (const op of node.reissue) this.lose(op)
    node.reissue = []
    node.role = { type: 'none' }
    node.up = false
    node.incarnation++
  }

  private bootstrap(node: Node): void {
    if (node.role.type !== 'none') return
    // Every round, as the controller does: the witness may have answered since the last one.
    const adopted = adoptWitnessRecord(node.record, node.witnessKnown, node.name)
    if (adopted !== undefined) this.persist(node, adopted)
    const retry = (): void => {
      this.onNode(node, bootstrapRetryMs, () => {
        this.bootstrap(node)
      })
    }
    this.call(
      node,
      node.peer,
      () => this.describe(this.nodes[node.peer]),
      (remote) => {
        this.decideStart(node, remote)
        if (node.role.type === 'none') retry()
      },
      () => {
        this.decideStart(node, undefined)
        if (node.role.type === 'none') retry()
      },
      2000,
    )
  }

  private decideStart(node: Node, remote: DescribeReply | undefined): void {
    if (node.role.type !== 'none') return
    if (remote !== undefined) {
      const fork = findFork(node.record.history ?? [], remote.history ?? [])
      if (fork !== undefined) {
        node.splitBrain = describeFork(fork)
        return
      }
    }
    const decision = decideRole({
      me: node.name,
      peer: node.peer,
      configuredPrimary: 'a',
      local: node.record,
      remote,
    })
    if (decision.type === 'primary') {
      this.persist(node, decision.record)
      node.hotSyncPending = true
      this.becomePrimary(node, false, false)
    } else if (decision.type === 'secondary') {
      this.persist(node, decision.record)
      this.becomeSecondary(node, decision.expectedPrimary as Name)
    } else {
      this.note(`${node.name} waits: ${decision.reason}`)
    }
  }

  private describe(node: Node): DescribeReply | undefined {
    if (!node.up) return undefined
    return {
      exists: true,
      epoch: node.record.epoch,
      primary: node.record.primary,
      state: node.record.state,
      dirty: !node.dirty.isEmpty,
      history: node.record.history,
      hot: [...node.al],
      bootId: `${node.name}-${node.bootId}`,
    }
  }

  private persist(node: Node, record: ReplicaRecord, forced = false): void {
    node.record = recordWithHistory(node.record, record, forced)
  }

  private persistDirtyLoop(node: Node): void {
    if (node.dirty.hasChanges) node.dirtyBits = node.dirty.takeChanges()
    this.onNode(node, dirtyPersistMs, () => {
      this.persistDirtyLoop(node)
    })
  }

  private persistDirtyNow(node: Node): void {
    node.dirtyBits = node.dirty.takeChanges()
  }

  private coolLoop(node: Node): void {
    const role = node.role
    if (role.type === 'primary' && !role.closed && node.dirty.isEmpty) {
      const extents = role.core.coolable()
      if (extents.length > 0) {
        this.primaryEffects(node, role, role.core.step({ type: 'coolExtents', extents }))
      }
    }
    this.onNode(node, coolEveryMs, () => {
      this.coolLoop(node)
    })
  }

  private roleStarted(node: Node): void {
    node.failover.roleStarted(this.local(node))
    node.witnessReport = undefined
  }

  private becomePrimary(node: Node, degraded: boolean, forced: boolean): void {
    const core = new PrimaryReplication({
      epoch: node.record.epoch,
      extentBytes,
      hotExtents: [...node.al],
      degraded: degraded || forced,
    })
    const role: PrimaryRole = {
      type: 'primary',
      core,
      degraded: degraded || forced,
      forced,
      issued: new Map(),
      flushes: new Map(),
      localInflight: 0,
      stream: undefined,
      connecting: false,
      peerIncarnation: undefined,
      closed: false,
    }
    node.role = role
    node.peerState = 'unknown'
    node.checkingPeer = false
    this.roleStarted(node)
    this.note(
      `${node.name} primary ${formatEpoch(node.record.epoch)}${role.degraded ? ' alone' : ''}${forced ? ' FORCED' : ''}`,
    )
    if (!degraded) {
      node.witnessReport ??= false
      this.report(node)
      this.connectLoop(node, role)
    }
    const again = node.reissue
    node.reissue = []
    for (const op of again) this.serve(node, op)
  }

  private becomeSecondary(node: Node, expectedPrimary: Name): void {
    node.role = {
      type: 'secondary',
      core: new SecondaryReplication({ epoch: node.record.epoch, primary: expectedPrimary }),
      expectedPrimary,
      stream: undefined,
      payloads: new Map(),
      syncedEpoch: undefined,
    }
    this.roleStarted(node)
    this.note(
      `${node.name} secondary of ${expectedPrimary} ${formatEpoch(node.record.epoch)} ${node.record.state}`,
    )
    for (const op of node.reissue) this.lose(op)
    node.reissue = []
    const forced = this.forcedOwner === undefined ? undefined : this.nodes[this.forcedOwner]
    if (
      node.name === this.splitSide &&
      expectedPrimary === this.forcedOwner &&
      forced !== undefined &&
      generationOf(node.record.epoch) >= generationOf(forced.record.epoch)
    ) {
      this.splitSide = undefined
    }
  }

  /**
   * Continue as primary with a new core (switchPrimary): pending requests fail over to it, and
   * what they may have written on one side only is marked dirty.
   */
  private switchPrimary(
    node: Node,
    old: PrimaryRole,
    degraded: boolean,
    why: string,
    epoch = nextTerm(node.record.epoch),
    forced = false,
  ): void {
    node.busy = true
    this.handOff(node, old, why)
    const finish = (): void => {
      if (old.localInflight > 0) {
        this.onNode(node, 1, finish)
        return
      }
      node.busy = false
      if (node.role !== old) return
      this.persist(node, { epoch, primary: node.name, state: 'UpToDate' }, forced)
      this.becomePrimary(node, degraded, false)
    }
    finish()
  }

  private handOff(node: Node, role: PrimaryRole, why: string): void {
    this.note(`${node.name} hands off ${formatEpoch(role.core.epoch)}: ${why}`)
    role.closed = true
    for (const issued of role.issued.values()) {
      const block = issued.op?.block ?? issued.copy?.block ?? 0
      const count = issued.op?.count ?? issued.copy?.count ?? 0
      node.dirty.mark(block * blockBytes, count * blockBytes)
      if (issued.op !== undefined) node.reissue.push(issued.op)
    }
    for (const flush of role.flushes.values()) if (flush !== 'sync') node.reissue.push(flush)
    role.issued.clear()
    role.flushes.clear()
    this.syncing.get(node.name)?.done()
    this.syncing.delete(node.name)
    this.breakStream(role.stream)
    if (node.peerState === 'syncing') {
      node.peerState = 'unknown'
      node.hotSyncPending = true
    }
  }

  // ---- replication stream

  private connectLoop(node: Node, role: PrimaryRole): void {
    const attempt = (): void => {
      if (node.role !== role || role.closed) return
      if (role.stream === undefined && !role.connecting) this.hello(node, role)
      this.onNode(node, connectRetryMs, attempt)
    }
    attempt()
  }

  private hello(node: Node, role: PrimaryRole): void {
    const peer = this.nodes[node.peer]
    role.connecting = true
    const epoch = role.core.epoch
    this.call(
      node,
      peer.name,
      () => this.onHello(peer, node.name, epoch),
      (answer) => {
        role.connecting = false
        if (node.role !== role || role.closed || answer.type !== 'accept') return
        if (role.peerIncarnation !== undefined && role.peerIncarnation !== answer.incarnation) {
          this.switchPrimary(node, role, false, 'the peer restarted')
          return
        }
        role.peerIncarnation = answer.incarnation
        const stream = this.openStream(node, peer)
        const peerRole = peer.role
        if (peerRole.type !== 'secondary' || peer.incarnation !== answer.incarnation) {
          stream.open = false
          return
        }
        this.breakStream(peerRole.stream)
        peerRole.stream = stream
        role.stream = stream
        this.primaryEffects(node, role, role.core.step({ type: 'peerConnected' }))
        this.checkPeer(node, role)
      },
      () => {
        role.connecting = false
      },
    )
  }

  private onHello(
    node: Node,
    from: Name,
    epoch: number,
  ): { type: 'accept'; incarnation: number } | { type: 'reject'; code: string } {
    const role = node.role
    if (role.type !== 'secondary') return { type: 'reject', code: 'NOT_SECONDARY' }
    if (from !== role.expectedPrimary) return { type: 'reject', code: 'WRONG_SENDER' }
    if (epoch < node.record.epoch) return { type: 'reject', code: 'EPOCH_STALE' }
    if (epoch > node.record.epoch) {
      const learned = learnedRecord(node.record, epoch, from)
      this.persist(node, learned)
      role.core.step({ type: 'epochChanged', epoch, primary: from })
      this.note(`${node.name} learns ${formatEpoch(epoch)} from ${from}: ${learned.state}`)
      return { type: 'reject', code: 'EPOCH_AHEAD' }
    }
    return { type: 'accept', incarnation: node.incarnation }
  }

  private secondaryReceive(node: Node, stream: Stream, message: Message): void {
    const role = node.role
    if (role.type !== 'secondary' || role.stream !== stream) return
    let effects: SecondaryEffect[]
    if (message.type === 'op') {
      role.payloads.set(`${message.epoch}:${message.seq}`, message.data)
      effects = role.core.step({
        type: 'receive',
        ...message.op,
        epoch: message.epoch,
        seq: message.seq,
        from: stream.primary,
        checksumOk: true,
      })
    } else if (message.type === 'flush') {
      effects = role.core.step({
        type: 'receiveFlush',
        epoch: message.epoch,
        flushId: message.flushId,
        from: stream.primary,
      })
    } else return
    this.secondaryEffects(node, role, effects)
  }

  private secondaryEffects(node: Node, role: SecondaryRole, effects: SecondaryEffect[]): void {
    for (const effect of effects) {
      switch (effect.type) {
        case 'writeLocal': {
          const key = `${effect.epoch}:${effect.seq}`
          const data = role.payloads.get(key) ?? []
          role.payloads.delete(key)
          this.onNode(node, this.ioDelay(), () => {
            this.writeDisk(node, effect.offset / blockBytes, data, effect.fua)
            if (node.role !== role) return
            const more = role.core.step({
              type: 'localDone',
              epoch: effect.epoch,
              seq: effect.seq,
              ok: true,
            })
            this.secondaryEffects(node, role, more)
          })
          break
        }
        case 'flushLocal':
          this.onNode(node, this.ioDelay(), () => {
            this.flushDisk(node)
            if (node.role !== role) return
            const more = role.core.step({
              type: 'localFlushDone',
              epoch: effect.epoch,
              flushId: effect.flushId,
              ok: true,
            })
            this.secondaryEffects(node, role, more)
          })
          break
        default:
          if (role.stream !== undefined) this.streamSend(role.stream, false, effect)
      }
    }
  }

  private primaryReceive(node: Node, stream: Stream, message: Message): void {
    const role = node.role
    if (role.type !== 'primary' || role.stream !== stream || role.closed) return
    const core = role.core
    let effects: PrimaryEffect[] = []
    switch (message.type) {
      case 'ack':
        effects = core.step({ type: 'peerAck', epoch: message.epoch, seq: message.seq })
        break
      case 'reject':
        effects = core.step({
          type: 'peerError',
          epoch: message.epoch,
          seq: message.seq,
          code: message.code,
        })
        break
      case 'flushAck':
        effects = core.step({
          type: 'peerFlushAck',
          epoch: message.epoch,
          flushId: message.flushId,
        })
        break
      case 'rejectFlush':
        effects = core.step({
          type: 'peerFlushError',
          epoch: message.epoch,
          flushId: message.flushId,
          code: message.code,
        })
        break
      default:
        return
    }
    this.primaryEffects(node, role, effects)
  }

  private primaryEffects(node: Node, role: PrimaryRole, effects: PrimaryEffect[]): void {
    for (const effect of effects) {
      switch (effect.type) {
        case 'persistActivityLog':
          this.onNode(node, this.ioDelay(), () => {
            for (const extent of effect.extents) node.al.add(extent)
            for (const extent of effect.coldExtents) node.al.delete(extent)
            if (node.role !== role || role.closed) return
            const more = role.core.step({
              type: 'activityLogPersisted',
              extents: effect.extents,
              coldExtents: effect.coldExtents,
            })
            this.primaryEffects(node, role, more)
          })
          break
        case 'markDirty':
          if (this.config.mutation !== 'noDirty') node.dirty.mark(effect.offset, effect.length)
          break
        case 'writeLocal': {
          const issued = role.issued.get(effect.requestId)
          if (issued === undefined) break
          const data = this.payload(node, issued)
          role.localInflight++
          this.onNode(node, this.ioDelay(), () => {
            this.writeDisk(node, effect.offset / blockBytes, data, effect.fua)
            role.localInflight--
            if (node.role !== role || role.closed) return
            const more = role.core.step({
              type: 'localDone',
              requestId: effect.requestId,
              ok: true,
            })
            this.primaryEffects(node, role, more)
          })
          break
        }
        case 'sendToPeer': {
          const issued = role.issued.get(effect.requestId)
          if (issued === undefined || role.stream === undefined) break
          const { epoch, seq, offset, length, fua, kind } = effect
          this.streamSend(role.stream, true, {
            type: 'op',
            epoch,
            seq,
            op: { offset, length, fua, kind },
            data: this.payload(node, issued),
          })
          break
        }
        case 'flushLocal':
          this.onNode(node, this.ioDelay(), () => {
            this.flushDisk(node)
            if (node.role !== role || role.closed) return
            const more = role.core.step({
              type: 'localFlushDone',
              flushId: effect.flushId,
              ok: true,
            })
            this.primaryEffects(node, role, more)
          })
          break
        case 'sendFlushToPeer':
          if (role.stream !== undefined) {
            this.streamSend(role.stream, true, {
              type: 'flush',
              epoch: effect.epoch,
              flushId: effect.flushId,
            })
          }
          break
        case 'disconnectPeer':
          this.breakStream(role.stream)
          break
        case 'reply':
          this.primaryReply(
            node,
            role,
            effect.requestId,
            effect.ok,
            effect.ok ? undefined : effect.code,
          )
          break
      }
    }
  }

  private payload(node: Node, issued: Issued): number[] {
    if (issued.data === undefined && issued.copy !== undefined) {
      issued.data = this.readDisk(node, issued.copy.block, issued.copy.count)
    }
    return issued.data ?? []
  }

  private primaryReply(
    node: Node,
    role: PrimaryRole,
    requestId: number,
    ok: boolean,
    code: ReplicationCode | undefined,
  ): void {
    const epoch = role.core.epoch
    const issued = role.issued.get(requestId)
    if (issued !== undefined) {
      role.issued.delete(requestId)
      if (issued.op !== undefined) this.clientDone(node, issued.op, ok, epoch)
      else this.copyDone(node, role, issued, ok)
      return
    }
    const flush = role.flushes.get(requestId)
    if (flush === undefined) return
    role.flushes.delete(requestId)
    if (flush === 'sync') this.syncFlushed(node, role, ok)
    else this.clientDone(node, flush, ok, epoch)
    if (!ok) this.note(`${node.name} flush failed ${code ?? ''}`)
  }

  // ---- resync (checkPeer)

  private checkPeer(node: Node, role: PrimaryRole): void {
    if (node.checkingPeer) return
    node.checkingPeer = true
    node.lastPeerCheckAt = this.local(node)
    const done = (): void => {
      if (node.role === role) node.checkingPeer = false
    }
    this.checkPeerOnce(node, role, done)
  }

  private checkPeerOnce(node: Node, role: PrimaryRole, done: () => void): void {
    this.call(
      node,
      node.peer,
      () => this.describe(this.nodes[node.peer]),
      (peer) => {
        if (node.role !== role || role.closed) {
          done()
          return
        }
        const fork = findFork(node.record.history ?? [], peer.history ?? [])
        if (fork !== undefined) {
          node.splitBrain = describeFork(fork)
          done()
          return
        }
        const plan = resyncPlan({
          sizeBytes,
          peer: {
            state: peer.state,
            bootId: peer.bootId,
            hot: peer.hot.map((extent) => ({ offset: extent * extentBytes, length: extentBytes })),
          },
          hotSyncPending: node.hotSyncPending,
          peerBootIdInSync: node.peerBootIdInSync,
          dirty: node.dirty.ranges(),
          ownHot: role.core
            .hotExtents()
            .map((extent) => ({ offset: extent * extentBytes, length: extentBytes })),
        })
        if (plan.type === 'inSync') {
          this.completeSync(node, role, peer.bootId, done)
          return
        }
        node.hotSyncPending = false
        node.peerState = 'syncing'
        node.witnessReport = false
        this.report(node)
        const copies: { block: number; count: number }[] = []
        for (const range of plan.ranges) {
          for (let at = range.offset; at < range.offset + range.length; at += dirtyChunkBytes) {
            const length = Math.min(dirtyChunkBytes, range.offset + range.length - at)
            copies.push({ block: at / blockBytes, count: length / blockBytes })
          }
        }
        this.count(
          'resyncBytes',
          copies.reduce((sum, copy) => sum + copy.count * blockBytes, 0),
        )
        this.count(`sync ${plan.kind}`)
        this.note(`${node.name} syncs ${plan.kind}: ${copies.length} chunks to ${node.peer}`)
        this.syncing.set(node.name, { queue: copies, inflight: 0, bootId: peer.bootId, done })
        this.pumpSync(node, role)
      },
      done,
    )
  }

  private readonly syncing = new Map<
    Name,
    {
      queue: { block: number; count: number }[]
      inflight: number
      bootId: string
      /** The check is over (ended or failed). */
      done: () => void
    }
  >()

  private pumpSync(node: Node, role: PrimaryRole): void {
    const sync = this.syncing.get(node.name)
    if (sync === undefined || node.role !== role || role.closed) return
    while (sync.inflight < syncCopiesMax && sync.queue.length > 0) {
      const copy = sync.queue.shift()
      if (copy === undefined) break
      sync.inflight++
      const requestId = node.nextRequest++
      role.issued.set(requestId, { op: undefined, copy, data: undefined })
      this.primaryEffects(
        node,
        role,
        role.core.step({
          type: 'clientWrite',
          requestId,
          kind: 'write',
          offset: copy.block * blockBytes,
          length: copy.count * blockBytes,
          fua: false,
        }),
      )
    }
    if (sync.inflight === 0 && sync.queue.length === 0) {
      const requestId = node.nextRequest++
      role.flushes.set(requestId, 'sync')
      this.primaryEffects(node, role, role.core.step({ type: 'clientFlush', requestId }))
    }
  }

  private copyDone(node: Node, role: PrimaryRole, issued: Issued, ok: boolean): void {
    const sync = this.syncing.get(node.name)
    if (sync === undefined || issued.copy === undefined) return
    sync.inflight--
    if (!ok) {
      this.syncing.delete(node.name)
      node.peerState = 'unknown'
      node.hotSyncPending = true
      sync.done()
      return
    }
    node.dirty.clear(issued.copy.block * blockBytes, issued.copy.count * blockBytes)
    this.pumpSync(node, role)
  }

  private syncFlushed(node: Node, role: PrimaryRole, ok: boolean): void {
    const sync = this.syncing.get(node.name)
    this.syncing.delete(node.name)
    if (sync === undefined) return
    if (!ok) {
      node.peerState = 'unknown'
      node.hotSyncPending = true
      sync.done()
      return
    }
    this.completeSync(node, role, sync.bootId, sync.done)
  }

  /** SyncComplete to the peer (also when there was nothing to copy), then in sync. */
  private completeSync(node: Node, role: PrimaryRole, bootId: string, done: () => void): void {
    const epoch = node.record.epoch
    const wasSyncing = node.peerState === 'syncing'
    this.call(
      node,
      node.peer,
      () => this.onSyncComplete(this.nodes[node.peer], node.name, epoch),
      (synced) => {
        done()
        if (node.role !== role || role.closed) return
        if (!synced) {
          node.peerState = 'unknown'
          node.hotSyncPending ||= wasSyncing
          return
        }
        if (wasSyncing) {
          node.dirty.clearAll()
          this.persistDirtyNow(node)
          this.note(`${node.name} sync to ${node.peer} complete`)
        }
        this.peerInSync(node, bootId)
      },
      () => {
        done()
        node.peerState = 'unknown'
        node.hotSyncPending ||= wasSyncing
      },
    )
  }

  private onSyncComplete(node: Node, from: Name, epoch: number): boolean {
    const role = node.role
    if (role.type !== 'secondary' || epoch !== node.record.epoch || from !== role.expectedPrimary) {
      return false
    }
    node.al.clear()
    this.persist(node, { ...node.record, state: 'UpToDate' })
    role.syncedEpoch = epoch
    this.roleStarted(node)
    this.note(`${node.name} is UpToDate`)
    return true
  }

  private peerInSync(node: Node, bootId: string): void {
    node.peerState = 'UpToDate'
    node.peerBootIdInSync = bootId
    node.witnessReport = true
    this.report(node)
  }

  // ---- witness

  private newArbiter(now: number): Arbiter {
    return new Arbiter(nodeLeaseDefaults, [this.witnessDurable], now)
  }

  /** Decide, make durable, apply, answer (the witness daemon's serial loop). */
  private decide(decision: Decision): { decision: Decision; record: VolumeRecord | undefined } {
    if (decision.ok && decision.change !== undefined) {
      this.witnessDurable = decision.change
      this.arbiter.apply(decision.change)
      this.note(
        `witness records ${formatEpoch(decision.change.epoch)} owner ${decision.change.owner}${decision.change.inSync ? ' in sync' : ' alone'}`,
      )
    }
    return { decision, record: this.arbiter.record('v') }
  }

  private learnWitness(node: Node, record: VolumeRecord | undefined): void {
    if (
      record !== undefined &&
      (node.witnessKnown === undefined || record.epoch >= node.witnessKnown.epoch)
    ) {
      node.witnessKnown = record
    }
  }

  private heartbeat(node: Node): void {
    const sentAt = this.local(node)
    this.call(
      node,
      'w',
      () => ({
        granted: this.arbiter.heartbeat(node.name, this.witnessNow()),
        record: this.arbiter.record('v'),
      }),
      (reply) => {
        node.witnessReady = true
        if (reply.granted) {
          node.witnessLeaseEnd = Math.max(
            node.witnessLeaseEnd,
            holderLeaseEnd(sentAt, nodeLeaseDefaults),
          )
        }
        this.learnWitness(node, reply.record)
      },
      () => undefined,
      heartbeatMs,
    )
    this.onNode(node, heartbeatMs, () => {
      this.heartbeat(node)
    })
  }

  private witnessLeaseValid(node: Node): boolean {
    return this.local(node) < node.witnessLeaseEnd
  }

  private report(node: Node): void {
    const inSync = node.witnessReport
    const role = node.role
    if (inSync === undefined || role.type !== 'primary' || node.reporting) return
    node.reporting = true
    const epoch = node.record.epoch
    this.call(
      node,
      'w',
      () =>
        this.decide(
          this.arbiter.report({
            volume: 'v',
            node: node.name,
            replicas: ['a', 'b'],
            epoch,
            primary: node.name,
            inSync,
          }),
        ),
      (reply) => {
        node.reporting = false
        this.learnWitness(node, reply.record)
        if (node.witnessReport === inSync) node.witnessReport = undefined
      },
      () => {
        node.reporting = false
      },
    )
  }

  // ---- failover (ReplicaController.tick and what it starts)

  private tick(node: Node): void {
    this.onNode(node, failoverTimingDefaults.tickMs, () => {
      this.tick(node)
    })
    const now = this.local(node)
    const role = node.role
    const step = node.failover.tick({
      now,
      role:
        role.type === 'primary'
          ? {
              type: 'primary',
              degraded: role.degraded,
              forced: role.forced,
              connected: role.stream !== undefined,
            }
          : role.type === 'secondary'
            ? { type: 'secondary', expectedPrimary: role.expectedPrimary, state: node.record.state }
            : { type: 'none' },
      witness: true,
      witnessLeaseValid: this.witnessLeaseValid(node),
      busy: node.busy,
      witnessVerdict: judgeWitnessRecord(node.record, node.witnessKnown, node.name).type,
    })
    if (step.renew) this.renewPeerLease(node, now)
    if (
      role.type === 'primary' &&
      !role.degraded &&
      !role.closed &&
      role.stream !== undefined &&
      node.peerState !== 'UpToDate' &&
      now - node.lastPeerCheckAt >= failoverTimingDefaults.retryMs
    ) {
      this.checkPeer(node, role)
    }
    if (role.type === 'primary' && node.witnessReport !== undefined) this.report(node)
    if (step.quorum?.type === 'regain') {
      node.failover.regained()
      if (node.quorumLost !== undefined) this.note(`${node.name} regains quorum`)
      node.quorumLost = undefined
    }
    if (step.quorum?.type === 'lose') this.loseQuorum(node, step.quorum.why)
    if (role.type === 'primary' && role.forced && node.witnessReport === undefined) {
      const record = node.witnessKnown
      if (record === undefined || record.epoch < node.record.epoch) {
        node.witnessReport = false
        this.report(node)
      }
    }
    if (role.type === 'primary' && step.action === 'reattach') this.reattach(node, role)
    else if (role.type === 'primary' && step.action === 'degrade') this.degrade(node, role)
    else if (role.type === 'secondary' && step.action === 'takeover') this.takeover(node, role)
    else if (step.action === 'adopt' || step.action === 'yield') {
      const verdict = judgeWitnessRecord(node.record, node.witnessKnown, node.name)
      if (role.type === 'primary' && verdict.type === 'adopt') {
        this.note(`${node.name} continues in ${formatEpoch(verdict.epoch)} (witness record)`)
        this.switchPrimary(
          node,
          role,
          role.degraded,
          'witness record',
          verdict.epoch,
          verdict.forced,
        )
      }
    }
    if (step.action === 'yield' && node.witnessKnown !== undefined) {
      this.note(`${node.name} follows the witness: ${node.witnessKnown.owner} owns a newer epoch`)
      this.yieldTo(node, node.witnessKnown)
    }
  }

  private renewPeerLease(node: Node, sentAt: number): void {
    const epoch = node.record.epoch
    const peer = this.nodes[node.peer]
    this.call(
      node,
      peer.name,
      () => {
        const role = peer.role
        const counterpart =
          epoch === peer.record.epoch &&
          ((role.type === 'primary' && !role.degraded) ||
            (role.type === 'secondary' && role.expectedPrimary === node.name))
        return { granted: peer.failover.grantRenewal(counterpart, this.local(peer)) }
      },
      (reply) => {
        node.failover.renewAnswered(sentAt, reply.granted && epoch === node.record.epoch)
      },
      () => {
        node.failover.renewAnswered(sentAt, false)
      },
      failoverTimingDefaults.peerLease.leaseMs / 2,
    )
  }

  private loseQuorum(node: Node, why: string): void {
    if (node.quorumLost === why) return
    const first = node.quorumLost === undefined
    node.quorumLost = why
    this.note(`${node.name} loses quorum: ${why}`)
    const role = node.role
    if (first && role.type === 'primary' && !role.degraded) {
      this.switchPrimary(node, role, false, 'quorum lost')
    }
  }

  private refused(node: Node, final: boolean, why: string): void {
    if (node.failover.refused(this.local(node), final)) this.loseQuorum(node, why)
  }

  /** Runs `work`, which calls `done` when it is over; the tick starts nothing meanwhile. */
  private attempt(node: Node, work: (done: () => void) => void): void {
    node.busy = true
    work(() => {
      node.busy = false
    })
  }

  private degrade(node: Node, role: PrimaryRole): void {
    this.attempt(node, (done) => {
      const epoch = node.record.epoch
      this.call(
        node,
        'w',
        () =>
          this.decide(
            this.arbiter.degrade({ volume: 'v', node: node.name, epoch }, this.witnessNow()),
          ),
        ({ decision, record }) => {
          this.learnWitness(node, record)
          done()
          if (node.role !== role || role.closed) return
          if (!decision.ok) {
            if (
              decision.code === 'FAILED_PRECONDITION' &&
              record !== undefined &&
              record.owner !== node.name &&
              record.epoch > node.record.epoch
            ) {
              this.yieldTo(node, record)
              return
            }
            this.refused(
              node,
              decision.code !== 'UNAVAILABLE',
              `degrade refused: ${decision.message}`,
            )
            return
          }
          this.note(
            `${node.name} runs alone by the witness (${formatEpoch(decision.record.epoch)})`,
          )
          const next = Math.max(decision.record.epoch, nextTerm(node.record.epoch))
          this.switchPrimary(node, role, true, 'the witness granted running alone', next)
        },
        () => {
          done()
          this.refused(node, false, 'the witness did not answer a degrade')
        },
      )
    })
  }

  private yieldTo(node: Node, record: VolumeRecord): void {
    const role = node.role
    if (role.type === 'primary') this.handOff(node, role, `${record.owner} owns the volume`)
    else if (role.type === 'secondary') this.breakStream(role.stream)
    const state = node.record.state === 'UpToDate' ? 'Outdated' : node.record.state
    this.persist(node, { epoch: record.epoch, primary: record.owner, state })
    this.becomeSecondary(node, record.owner as Name)
  }

  private takeover(node: Node, role: SecondaryRole): void {
    const before = node.record
    this.attempt(node, (done) => {
      const epoch = node.record.epoch
      this.call(
        node,
        'w',
        () =>
          this.decide(
            this.arbiter.takeover({ volume: 'v', node: node.name, epoch }, this.witnessNow()),
          ),
        ({ decision, record }) => {
          this.learnWitness(node, record)
          done()
          if (node.role !== role || node.record !== before) return
          if (!decision.ok) {
            if (record !== undefined && record.owner !== node.name && !record.inSync) {
              if (node.record.state === 'UpToDate') {
                this.persist(node, { ...node.record, state: 'Outdated' })
              }
              this.loseQuorum(node, `${record.owner} runs alone; this replica is Outdated`)
              return
            }
            this.refused(
              node,
              decision.code !== 'UNAVAILABLE',
              `takeover refused: ${decision.message}`,
            )
            return
          }
          if (decision.record.epoch <= node.record.epoch) {
            this.refused(node, true, 'stale takeover grant')
            return
          }
          this.breakStream(role.stream)
          this.persist(node, {
            epoch: decision.record.epoch,
            primary: node.name,
            state: 'UpToDate',
          })
          this.count('takeovers')
          this.becomePrimary(node, true, false)
        },
        () => {
          done()
          this.refused(node, false, 'the witness did not answer a takeover')
        },
      )
    })
  }

  private reattach(node: Node, role: PrimaryRole): void {
    this.attempt(node, (done) => {
      this.call(
        node,
        node.peer,
        () => this.describe(this.nodes[node.peer]),
        (peer) => {
          done()
          if (node.role !== role || role.closed) return
          const fork = findFork(node.record.history ?? [], peer.history ?? [])
          if (fork !== undefined) {
            if (node.splitBrain === undefined) this.note(`${node.name}: ${describeFork(fork)}`)
            node.splitBrain = describeFork(fork)
            return
          }
          node.splitBrain = undefined
          if (peer.primary === node.peer && peer.epoch > node.record.epoch) return
          this.count('reattaches')
          const epoch = role.forced
            ? nextGeneration(Math.max(node.record.epoch, peer.epoch, node.witnessKnown?.epoch ?? 0))
            : nextTerm(node.record.epoch)
          this.switchPrimary(node, role, false, 'the peer is back', epoch, role.forced)
        },
        done,
      )
    })
  }

  /** `duplex volume promote --force` on `node`: alone in a new generation, without the witness. */
  private forcePromote(node: Node): void {
    const role = node.role
    if (role.type === 'none' || node.busy) return
    if (role.type === 'primary' && (role.degraded || role.stream !== undefined)) return
    if (role.type === 'secondary' && node.failover.peerLeaseValid(this.local(node))) return
    this.note(`ADMIN forces ${node.name} to primary`)
    node.busy = true
    const until = node.failover.detach()
    const proceed = (): void => {
      if (this.local(node) < until) {
        this.onNode(node, until - this.local(node), proceed)
        return
      }
      node.busy = false
      if (node.role !== role) return
      if (role.type === 'primary') this.handOff(node, role, 'forced promotion')
      else this.breakStream(role.stream)
      const epoch = nextGeneration(Math.max(node.record.epoch, node.witnessKnown?.epoch ?? 0))
      this.persist(node, { epoch, primary: node.name, state: 'UpToDate' }, true)
      this.count('forcedPromotions')
      // The admin accepted that acknowledged writes the other side holds may be lost: from now
      // on this replica's content is the floor, and the other side's later writes are the split
      // brain.
      this.forcedOwner = node.name
      this.splitSide = node.peer
      this.era++
      this.ackEpochs.clear()
      this.maxAckEpoch = epoch
      for (let block = 0; block < blocks; block++) {
        const value = node.disk.cache[block] ?? 0
        this.floor[block] = value
        this.readFloor[block] = value
        this.limbo[block] = 0
        // Durable on the other side only does not count any more.
        const durable = node.disk.durable[block] ?? 0
        this.durableFloor[block] = Math.min(this.durableFloor[block] ?? 0, durable)
      }
      this.becomePrimary(node, true, true)
      node.quorumLost = undefined
    }
    proceed()
  }

  /** `duplex volume resolve --keep keep` on the other node. */
  private resolve(discard: Node, keep: Node): void {
    const role = discard.role
    if (role.type === 'primary') this.handOff(discard, role, `discarded in favour of ${keep.name}`)
    else if (role.type === 'secondary') this.breakStream(role.stream)
    for (const op of discard.reissue) this.lose(op)
    discard.reissue = []
    discard.dirty.clearAll()
    this.persistDirtyNow(discard)
    discard.al.clear()
    discard.record = {
      epoch: keep.record.epoch,
      primary: keep.name,
      state: 'Inconsistent',
      ...(keep.record.history === undefined ? {} : { history: keep.record.history }),
    }
    discard.splitBrain = undefined
    keep.splitBrain = undefined
    // What the discarded side held is gone, by the admin's choice: the kept replica is the floor.
    this.era++
    this.splitSide = undefined
    this.ackEpochs.clear()
    this.maxAckEpoch = keep.record.epoch
    for (let block = 0; block < blocks; block++) {
      const value = keep.disk.cache[block] ?? 0
      this.floor[block] = value
      this.readFloor[block] = value
      this.limbo[block] = 0
      this.durableFloor[block] = Math.min(
        this.durableFloor[block] ?? 0,
        keep.disk.durable[block] ?? 0,
      )
    }
    this.note(`ADMIN resolves the split brain keeping ${keep.name}`)
    this.count('resolves')
    this.becomeSecondary(discard, keep.name)
  }

  // ---- client

  private clientTick(): void {
    if (!this.clientOn) return
    this.after(1 + this.rng.int(40), () => {
      this.clientTick()
    })
    if (this.clientInflight >= 8) return
    const roll = this.rng.next()
    const block = this.rng.int(blocks)
    const count = Math.min(1 + this.rng.int(4), blocks - block)
    let op: ClientOp
    if (roll < 0.55) {
      for (let at = block; at < block + count; at++) if (this.writing[at] === 1) return
      for (let at = block; at < block + count; at++) this.writing[at] = 1
      op = this.newOp('write', block, count, this.rng.bool(0.1))
      this.unsettled.add(op.version)
    } else if (roll < 0.9) {
      op = this.newOp('read', block, count, false)
      op.snapshot = this.floor.slice(block, block + count)
    } else {
      op = this.newOp('flush', 0, 0, false)
      op.snapshot = this.floor.slice()
    }
    // The hypervisor on one site or the other; a node that is down refuses the connection.
    const node = this.nodes[this.rng.bool(0.5) ? 'a' : 'b']
    this.clientInflight++
    if (!node.up) {
      this.clientDone(node, op, false, 0)
      return
    }
    this.after(this.delay(), () => {
      if (!node.up) this.clientDone(node, op, false, 0)
      else this.serve(node, op)
    })
  }

  private newOp(kind: ClientOp['kind'], block: number, count: number, fua: boolean): ClientOp {
    return {
      id: this.nextOp++,
      kind,
      block,
      count,
      version: kind === 'write' ? this.nextVersion++ : 0,
      fua,
      snapshot: undefined,
      era: this.era,
      forwarded: false,
      done: false,
    }
  }

  /** A node serves a client request (ReplicaController.settled and mutate, without forwarding). */
  private serve(node: Node, op: ClientOp): void {
    const role = node.role
    if (op.kind === 'read') {
      const local =
        role.type === 'primary'
          ? !role.closed && this.mayServe(node, role, 'read')
          : role.type === 'secondary' &&
            node.record.state === 'UpToDate' &&
            role.syncedEpoch === node.record.epoch &&
            (node.failover.peerLeaseValid(this.local(node)) ||
              this.config.mutation === 'readsWithoutLease')
      if (!local) {
        this.forward(node, op)
        return
      }
      this.checkRead(node, op, this.readDisk(node, op.block, op.count))
      this.clientDone(node, op, true, 0)
      return
    }
    if (role.type !== 'primary') {
      this.forward(node, op)
      return
    }
    if (role.closed || !this.mayServe(node, role, 'write')) {
      this.clientDone(node, op, false, 0)
      return
    }
    const requestId = node.nextRequest++
    if (op.kind === 'flush') {
      role.flushes.set(requestId, op)
      this.primaryEffects(node, role, role.core.step({ type: 'clientFlush', requestId }))
      return
    }
    role.issued.set(requestId, {
      op,
      copy: undefined,
      data: Array.from({ length: op.count }, () => op.version),
    })
    this.primaryEffects(
      node,
      role,
      role.core.step({
        type: 'clientWrite',
        requestId,
        kind: 'write',
        offset: op.block * blockBytes,
        length: op.count * blockBytes,
        fua: op.fua,
      }),
    )
  }

  /**
   * A request this node cannot serve goes to its peer (ReplicaController.forward), once: the
   * answer comes back to the client from there (its loss on the way back is not modelled).
   */
  private forward(node: Node, op: ClientOp): void {
    if (op.forwarded) {
      this.clientDone(node, op, false, 0)
      return
    }
    op.forwarded = true
    const peer = this.nodes[node.peer]
    if (!this.linkUp(node.name, peer.name)) {
      this.clientDone(node, op, false, 0)
      return
    }
    this.count('forwarded')
    this.after(this.delay(), () => {
      if (!peer.up || !this.linkUp(node.name, peer.name)) this.lose(op)
      else this.serve(peer, op)
    })
  }

  private mayServe(node: Node, role: PrimaryRole, access: 'read' | 'write'): boolean {
    if (role.forced) return true
    if (node.quorumLost !== undefined) return false
    if (role.degraded) return this.witnessLeaseValid(node)
    return access === 'write' || node.failover.peerLeaseValid(this.local(node))
  }

  private lose(op: ClientOp): void {
    if (op.done) return
    op.done = true
    this.clientInflight--
    if (op.kind === 'write') {
      for (let at = op.block; at < op.block + op.count; at++) this.writing[at] = 0
    }
    this.count('lost')
  }

  private clientDone(node: Node, op: ClientOp, ok: boolean, epoch: number): void {
    if (op.done) return
    op.done = true
    this.clientInflight--
    this.count(ok ? `${op.kind} ok` : `${op.kind} failed`)
    if (op.kind === 'write') {
      for (let at = op.block; at < op.block + op.count; at++) this.writing[at] = 0
      if (ok) this.unsettled.delete(op.version)
    }
    if (!ok || op.kind === 'read') return
    if (node.name === this.splitSide) {
      this.count('split-brain acks')
      return
    }
    const owner = this.ackEpochs.get(epoch)
    if (owner !== undefined && owner !== node.name) {
      this.fail(`${node.name} acknowledged in epoch ${formatEpoch(epoch)}, owned by ${owner}`)
    }
    this.ackEpochs.set(epoch, node.name)
    if (epoch < this.maxAckEpoch) {
      this.fail(
        `${node.name} acknowledged in epoch ${formatEpoch(epoch)} after an acknowledgement in ${formatEpoch(this.maxAckEpoch)}`,
      )
    }
    this.maxAckEpoch = epoch
    if (op.kind === 'write') {
      for (let at = op.block; at < op.block + op.count; at++) {
        this.floor[at] = Math.max(this.floor[at] ?? 0, op.version)
        if (op.fua) this.durableFloor[at] = Math.max(this.durableFloor[at] ?? 0, op.version)
      }
    } else if (op.snapshot !== undefined) {
      for (let at = 0; at < blocks; at++) {
        const covered = op.snapshot[at] ?? 0
        const kept = op.era === this.era ? covered : Math.min(covered, this.floor[at] ?? 0)
        this.durableFloor[at] = Math.max(this.durableFloor[at] ?? 0, kept)
      }
    }
  }

  private checkRead(node: Node, op: ClientOp, data: number[]): void {
    if (node.name === this.splitSide) {
      this.count('split-brain reads')
      return
    }
    this.count('reads checked')
    data.forEach((value, index) => {
      const at = op.block + index
      const snapshot = op.snapshot?.[index] ?? 0
      const started = op.era === this.era ? snapshot : Math.min(snapshot, this.floor[at] ?? 0)
      const floor = Math.max(started, this.readFloor[at] ?? 0)
      if (value < floor) {
        this.fail(
          `stale read at ${node.name} (${node.role.type} ${formatEpoch(node.record.epoch)} ${node.record.state}): block ${at} holds write ${value}, write ${floor} was acknowledged or read before this read began`,
        )
      }
      // Reads are monotonic: once a settled write was seen, nothing older may be (except where
      // a power loss left the replicas different, until they agree again).
      if (this.limbo[at] === 1 && this.nodes.a.disk.cache[at] === this.nodes.b.disk.cache[at]) {
        this.limbo[at] = 0
      }
      if (!this.unsettled.has(value) && this.limbo[at] === 0) {
        this.readFloor[at] = Math.max(this.readFloor[at] ?? 0, value)
      }
    })
  }

  /** Never two nodes allowed to acknowledge writes alone at the same time. */
  private checkSoloWriters(): void {
    if (this.splitSide !== undefined) return
    const solo = names.filter((name) => {
      const node = this.nodes[name]
      const role = node.role
      return (
        node.up &&
        role.type === 'primary' &&
        role.degraded &&
        !role.closed &&
        this.mayServe(node, role, 'write')
      )
    })
    if (solo.length > 1) this.fail('both nodes may acknowledge writes alone')
  }

  // ---- faults

  private faultTick(): void {
    if (!this.faultsOn) return
    this.after((1000 / this.config.faultRate) * (0.5 + this.rng.next()), () => {
      this.faultTick()
    })
    const roll = this.rng.int(100)
    const node = this.nodes[this.rng.bool(0.5) ? 'a' : 'b']
    if (roll < 30) {
      const links = ['a-b', 'a-w', 'b-w', 'site']
      const which = links[this.rng.int(links.length)] ?? 'a-b'
      const cuts =
        which === 'site'
          ? [this.linkKey(node.name, node.peer), this.linkKey(node.name, 'w')]
          : [which]
      this.note(`FAULT cut ${cuts.join(' ')}`)
      for (const key of cuts) this.cut.add(key)
      for (const key of cuts) {
        const [x, y] = key.split('-') as [Site, Site]
        if (x !== 'w' && y !== 'w') this.breakStreamsOf(x)
      }
      this.after(1000 + this.rng.int(9000), () => {
        for (const key of cuts) this.cut.delete(key)
        this.note(`heal ${cuts.join(' ')}`)
      })
    } else if (roll < 50) {
      if (!node.up) return
      this.note(`FAULT kill -9 ${node.name}`)
      this.stopProcess(node)
      this.after(500 + this.rng.int(8000), () => {
        if (!node.up && this.faultsOn) this.startProcess(node)
      })
    } else if (roll < 62) {
      if (!node.up) return
      this.powerLoss([node])
    } else if (roll < 67) {
      this.powerLoss(names.map((name) => this.nodes[name]).filter((each) => each.up))
    } else if (roll < 85) {
      if (!this.witnessUp) return
      this.note('FAULT witness killed')
      this.witnessUp = false
      this.witnessIncarnation++
      this.after(1000 + this.rng.int(10_000), () => {
        this.restartWitness()
      })
    } else if (this.config.forcedPromotions && roll < 95) {
      // A site and the witness are lost together; after a while an admin forces the survivor.
      const survivor = this.nodes[node.peer]
      const cuts = [this.linkKey(node.name, node.peer), this.linkKey(node.name, 'w')]
      this.note(`FAULT site ${node.name} and the witness lost`)
      for (const key of cuts) this.cut.add(key)
      this.breakStreamsOf(node.name)
      if (this.witnessUp) {
        this.witnessUp = false
        this.witnessIncarnation++
      }
      this.after(4000 + this.rng.int(4000), () => {
        // One forced promotion per run: a second one before the first split brain is resolved
        // leaves two forced lineages, and which to keep is the admin's judgement.
        if (
          this.faultsOn &&
          this.forcedOwner === undefined &&
          survivor.up &&
          !this.witnessUp &&
          survivor.quorumLost !== undefined
        ) {
          this.forcePromote(survivor)
        }
      })
      this.after(9000 + this.rng.int(10_000), () => {
        for (const key of cuts) this.cut.delete(key)
        this.note(`heal ${cuts.join(' ')}`)
        this.restartWitness()
      })
    }
  }

  private restartWitness(): void {
    if (this.witnessUp) return
    this.witnessUp = true
    this.arbiter = this.newArbiter(this.witnessNow())
    this.note('witness restarts')
  }

  /** Power lost: each node's page cache keeps a random part of what was not flushed. */
  private powerLoss(lost: Node[]): void {
    if (lost.length === 0) return
    this.note(`FAULT power loss ${lost.map((node) => node.name).join(' ')}`)
    for (const node of lost) {
      this.stopProcess(node)
      for (const at of node.disk.unsynced) {
        if (this.rng.bool(0.5)) node.disk.durable[at] = node.disk.cache[at] ?? 0
      }
      node.disk.unsynced.clear()
      node.disk.cache.set(node.disk.durable)
      node.bootId++
    }
    // A write acknowledged but not durable (no FUA, no FLUSH since) may be lost on a power
    // loss, as on any disk; after a resync the replicas agree on the value the owner kept. Only a
    // secondary that lost power while its primary runs on must get every such write back.
    this.era++
    const [only] = lost
    const peer = only === undefined ? undefined : this.nodes[only.peer]
    const strict =
      lost.length === 1 &&
      only?.role.type === 'secondary' &&
      peer?.up === true &&
      peer.role.type === 'primary' &&
      !peer.role.degraded
    for (let at = 0; at < blocks; at++) {
      const a = this.nodes.a.disk.cache[at] ?? 0
      const b = this.nodes.b.disk.cache[at] ?? 0
      const durable = this.durableFloor[at] ?? 0
      if (Math.max(a, b) < durable) {
        this.fail(`power loss lost write ${durable} on block ${at}, acknowledged durable`)
      }
      const floor = this.floor[at] ?? 0
      const kept = strict ? Math.max(a, b) : Math.min(a, b)
      this.floor[at] = Math.max(durable, Math.min(floor, kept))
      this.readFloor[at] = Math.min(this.readFloor[at] ?? 0, this.floor[at] ?? 0)
      if (!strict && a !== b && Math.max(a, b) > durable) this.limbo[at] = 1
    }
    for (const node of lost) {
      this.after(500 + this.rng.int(6000), () => {
        if (!node.up && this.faultsOn) this.startProcess(node)
      })
    }
  }

  private endFaults(): void {
    this.faultsOn = false
    this.cut.clear()
    this.note('END OF FAULTS: links heal, processes start')
    this.restartWitness()
    for (const node of names.map((name) => this.nodes[name])) if (!node.up) this.startProcess(node)
  }

  // ---- the end

  private converge(): void {
    const deadline = this.real + 60_000
    for (;;) {
      this.runUntil(this.real + 500)
      const { a, b } = this.nodes
      const split = [a, b].find((node) => node.splitBrain !== undefined)
      if (split !== undefined) {
        if (this.forcedOwner === undefined)
          this.fail(`split brain without a forced promotion: ${split.splitBrain ?? ''}`)
        // The admin keeps a replica that may be kept (UpToDate, its own primary, not behind the
        // other side at the witness: what resolve accepts), the serving one first, else the
        // forced one.
        const keepable = [a, b].filter((node) => {
          const witness = this.nodes[node.peer].witnessKnown
          const contradicted =
            witness !== undefined &&
            witness.owner === node.peer &&
            witness.epoch > node.record.epoch
          return (
            node.up &&
            node.record.primary === node.name &&
            node.record.state === 'UpToDate' &&
            !contradicted
          )
        })
        const keep =
          keepable.find((node) => node.role.type === 'primary') ??
          keepable.find((node) => node.name === this.forcedOwner) ??
          keepable[0]
        if (keep !== undefined) this.resolve(this.nodes[keep.peer], keep)
        else if (this.real > deadline) this.fail('split brain with no replica to keep')
        continue
      }
      if (this.converged()) break
      if (this.real > deadline) {
        this.fail(
          `no convergence 60 s after the faults ended: ${this.describeNode(a)}; ${this.describeNode(b)}; witness ${JSON.stringify(this.arbiter.record('v'))}`,
        )
      }
    }
    const primary = names
      .map((name) => this.nodes[name])
      .find((node) => node.role.type === 'primary')
    const secondary = primary === undefined ? undefined : this.nodes[primary.peer]
    if (primary === undefined || secondary === undefined) return
    for (let at = 0; at < blocks; at++) {
      const p = primary.disk.cache[at] ?? 0
      const s = secondary.disk.cache[at] ?? 0
      if (p !== s)
        this.fail(
          `replicas differ after resync: block ${at} ${primary.name}=${p} ${secondary.name}=${s}`,
        )
      if (p < (this.floor[at] ?? 0)) {
        this.fail(`acknowledged write ${this.floor[at] ?? 0} lost on block ${at} (holds ${p})`)
      }
    }
    this.count('converged')
  }

  private converged(): boolean {
    const { a, b } = this.nodes
    const primary = [a, b].find((node) => node.role.type === 'primary')
    if (primary === undefined || this.clientInflight > 0) return false
    const role = primary.role
    const secondary = this.nodes[primary.peer]
    const record = this.arbiter.record('v')
    return (
      role.type === 'primary' &&
      !role.degraded &&
      role.stream !== undefined &&
      primary.peerState === 'UpToDate' &&
      primary.record.state === 'UpToDate' &&
      secondary.role.type === 'secondary' &&
      secondary.record.state === 'UpToDate' &&
      record?.owner === primary.name &&
      record.inSync &&
      primary.witnessReport === undefined
    )
  }

  private describeNode(node: Node): string {
    const role = node.role
    const kind =
      role.type === 'primary'
        ? `primary${role.degraded ? ' alone' : ''}${role.stream === undefined ? ' unconnected' : ''}`
        : role.type
    return `${node.name} ${kind} ${formatEpoch(node.record.epoch)} ${node.record.state} peer ${node.peerState}${node.quorumLost === undefined ? '' : ` (no quorum: ${node.quorumLost})`}`
  }
}

/** The configuration CI and long runs use. */
export function failoverConfig(seed: number, mutation: Mutation = 'none'): FailoverSimConfig {
  return { seed, horizonMs: 30_000, mutation, faultRate: 0.25, forcedPromotions: true }
}

export function runFailoverSim(config: FailoverSimConfig): FailoverSimResult {
  return new FailoverSim(config).run()
}
