/**
 * One simulated volume: a primary node `a` and a secondary node `b`, each running the REAL pure
 * replication core (PrimaryReplication / SecondaryReplication) behind a simulated driver, over a
 * `SimNetwork` stream, on `SimDisk`s, the primary's activity log in a `SimMetaStore`, all on one
 * `SimClock`. Nodes are network endpoints with inboxes, so a witness node (issue 4) plugs in as a
 * third endpoint.
 *
 * - Clients: an open-loop random workload (reads, writes, trims, zeroes, flushes, FUA) against the
 *   primary, admitted in FIFO order while `canAdmit` allows (head-of-line blocking, as an NBD
 *   connection that stops reading). Every client-visible event goes to `history` with its time.
 * - Drivers perform the cores' effects: disk I/O completes after random delays (out of order),
 *   `persistActivityLog` is a synced metadata batch, peer messages ride the stream, the primary
 *   reconnects after a break and reports `peerConnected`, and cools `coolable()` extents.
 * - Faults, each from the seed at configurable rates: stream disconnects, partitions, delay
 *   spikes, checksum errors, duplicate delivery after reconnects, secondary crash, primary crash,
 *   power loss (both). There is no witness and no degraded mode yet, so a crash of either node
 *   ends the epoch's stream for good (a restarted peer must not get `peerConnected` re-sends):
 *   afterwards writes stay pending.
 * - Invariants (see `checkCrash`, `onReply`, `finishRead`, `finish`): no acknowledged durable
 *   write lost; reply only after both replicas completed; activity log covers every divergence;
 *   identical replicas after a fault-free quiescence (crashes are the faults that count); no
 *   stale read at the primary; and each write's extents are durably hot when it is issued.
 */
import {
  PrimaryReplication,
  SecondaryReplication,
  type BlockOp,
  type OpKind,
  type PrimaryEffect,
  type ReplicationCode,
  type SecondaryEffect,
} from '../../src/replica/replication.js'
import { Prng } from '../lib/prng.js'
import { NodeClock, SimClock } from './clock.js'
import { SimDisk, SimMetaStore, sectorBytes, type FlushToken } from './disk.js'
import { SimNetwork, type Endpoint } from './network.js'

export const primaryName = 'a'
export const secondaryName = 'b'
const epoch = 1

/** Events per second of simulated time. */
export interface FaultRates {
  disconnect: number
  partition: number
  spike: number
  secondaryCrash: number
  primaryCrash: number
  powerLoss: number
}

export interface SimConfig {
  seed: number
  workload: string
  sizeBytes: number
  extentBytes: number
  /** Client requests and faults stop after this; then the cluster runs to quiescence. */
  horizonMs: number
  interArrivalMsMean: number
  /** Relative weights. */
  mix: Record<'read' | 'write' | 'trim' | 'zero' | 'flush', number>
  fuaRate: number
  opBytesMax: number
  inflightOpsMax: number
  inflightBytesMax: number
  seqWindowMax: number
  peerRetriesMax: number
  checksumErrorRate: number
  duplicateRate: number
  faults: FaultRates
  coolEveryMs: number
  /** Node clocks run within 1 +- driftMax of true time. */
  driftMax: number
  /** Off: the driver also filters extents loaded at a restart (a second guard; the core pins them). */
  coolLoadedExtents: boolean
  stepsMax: number
}

export type PeerMessage =
  | { type: 'replicate'; epoch: number; seq: number; requestId: number; op: BlockOp }
  | { type: 'flush'; epoch: number; flushId: number; requestId: number }
  | Exclude<SecondaryEffect, { type: 'writeLocal' } | { type: 'flushLocal' }>

export type RequestKind = OpKind | 'read' | 'flush'

export type HistoryEvent =
  | {
      atMs: number
      type: 'start'
      id: number
      kind: RequestKind
      offset: number
      length: number
      fua: boolean
    }
  | { atMs: number; type: 'reply'; id: number; ok: true }
  | { atMs: number; type: 'reply'; id: number; ok: false; code: ReplicationCode }
  | { atMs: number; type: 'lost'; id: number }
  | { atMs: number; type: 'fault'; what: string }

interface ClientRequest {
  id: number
  kind: RequestKind
  offset: number
  length: number
  fua: boolean
  startMs: number
  incarnation: number
  replied: boolean
  doneA: number | undefined
  doneB: number | undefined
  /** Flush: per sector, the last acknowledged version when the flush was admitted. */
  covers: Uint32Array | undefined
  /** Read: per sector of its range, the last acknowledged version when it started. */
  floor: Uint32Array | undefined
}

export interface SimResult {
  config: SimConfig
  violations: string[]
  trace: string[]
  history: HistoryEvent[]
  stats: Record<string, number>
  endMs: number
}

const traceTailMax = 60

export class Cluster {
  readonly clock = new SimClock()
  readonly violations: string[] = []
  readonly history: HistoryEvent[] = []
  readonly stats: Record<string, number> = {}
  private readonly traceRing: string[] = []
  private traceNext = 0

  private readonly prngWorkload: Prng
  private readonly prngFaults: Prng
  private readonly prngIo: Prng
  readonly network: SimNetwork<PeerMessage>
  readonly diskA: SimDisk
  readonly diskB: SimDisk
  readonly meta: SimMetaStore
  private readonly clockA: NodeClock
  private readonly clockB: NodeClock

  private primary: PrimaryReplication
  private secondary: SecondaryReplication
  private aliveA = true
  private aliveB = true
  private incarnationA = 0
  private incarnationB = 0
  /** A crash ended this epoch's stream: no reconnect until resync exists (issue 4). */
  private streamEnded = false
  private crashes = 0
  private reconnectPending = false
  private loadedHot = new Set<number>()

  private readonly requests = new Map<number, ClientRequest>()
  private backlog: ClientRequest[] = []
  private nextRequestId = 1
  private readonly flushRequestOf = new Map<number, number>()
  /** Secondary: `epoch:seq` -> request id (the payload's identity). */
  private seqRequest = new Map<string, number>()
  private readonly kindOf = new Map<number, OpKind>()
  /** Per sector: the newest version acknowledged ok (what a read must at least return). */
  private readonly lastAcked: Uint32Array
  /** Per sector: the newest version acknowledged AND durable (FUA, or covered by a flush ok). */
  private readonly mustSurvive: Uint32Array
  private winding = false

  constructor(readonly config: SimConfig) {
    const seed = config.seed
    this.prngWorkload = new Prng(mix(seed, 1))
    this.prngFaults = new Prng(mix(seed, 2))
    this.prngIo = new Prng(mix(seed, 3))
    const prngNet = new Prng(mix(seed, 4))
    this.network = new SimNetwork<PeerMessage>(this.clock, prngNet, {
      delayMsMin: 0.05,
      delayMsMax: 1.5,
      duplicateRate: config.duplicateRate,
      datagramDropRate: 0.1,
      replayWindow: 32,
    })
    this.diskA = new SimDisk(config.sizeBytes, new Prng(mix(seed, 5)))
    this.diskB = new SimDisk(config.sizeBytes, new Prng(mix(seed, 6)))
    this.meta = new SimMetaStore(new Prng(mix(seed, 7)))
    const drift = (): number => 1 + (this.prngFaults.next() * 2 - 1) * config.driftMax
    this.clockA = new NodeClock(this.clock, drift())
    this.clockB = new NodeClock(this.clock, drift())
    this.lastAcked = new Uint32Array(this.diskA.sectors)
    this.mustSurvive = new Uint32Array(this.diskA.sectors)
    this.primary = this.newPrimary([])
    this.secondary = this.newSecondary()
    this.network.register(primaryName, this.primaryEndpoint())
    this.network.register(secondaryName, this.secondaryEndpoint())
  }

  /** Runs the whole scenario; stops at the first violation. */
  run(): SimResult {
    this.network.connect(primaryName, secondaryName)
    this.scheduleArrival()
    this.scheduleCooling()
    this.scheduleFaults()
    this.clock.schedule(this.config.horizonMs, 'horizon', () => {
      this.windDown()
    })
    this.drain()
    if (this.violations.length === 0) this.finish()
    return {
      config: this.config,
      violations: this.violations,
      trace: this.traceTail(),
      history: this.history,
      stats: { ...this.stats, ...prefixed('net.', { ...this.network.stats }) },
      endMs: this.clock.nowMs,
    }
  }

  // ---- plumbing

  private drain(): void {
    let steps = 0
    while (this.violations.length === 0 && this.clock.runNext() !== undefined) {
      steps += 1
      if (steps > this.config.stepsMax) {
        this.violate(`no quiescence after ${steps} steps`)
        break
      }
    }
    this.count('steps', steps)
  }

  private count(name: string, n = 1): void {
    this.stats[name] = (this.stats[name] ?? 0) + n
  }

  private trace(line: string): void {
    const entry = `${this.clock.nowMs.toFixed(3)} ${line}`
    if (this.traceRing.length < traceTailMax) this.traceRing.push(entry)
    else this.traceRing[this.traceNext] = entry
    this.traceNext = (this.traceNext + 1) % traceTailMax
  }

  private traceTail(): string[] {
    if (this.traceRing.length < traceTailMax) return [...this.traceRing]
    return [...this.traceRing.slice(this.traceNext), ...this.traceRing.slice(0, this.traceNext)]
  }

  private violate(message: string): void {
    this.trace(`VIOLATION ${message}`)
    this.violations.push(`t=${this.clock.nowMs.toFixed(3)}: ${message}`)
  }

  private ioDelay(minMs: number, maxMs: number): number {
    return minMs + this.prngIo.next() * (maxMs - minMs)
  }

  private hotDurable(): Set<number> {
    const hot = new Set<number>()
    for (const key of this.meta.durable.keys()) hot.add(Number(key.slice(3)))
    return hot
  }

  private extentsOf(offset: number, length: number): number[] {
    const out: number[] = []
    if (length === 0) return out
    const last = Math.floor((offset + length - 1) / this.config.extentBytes)
    for (let e = Math.floor(offset / this.config.extentBytes); e <= last; e++) out.push(e)
    return out
  }

  private contentOf(version: number): number {
    return this.kindOf.get(version) === 'write' ? version : 0
  }

  // ---- primary node

  private newPrimary(hot: number[]): PrimaryReplication {
    return new PrimaryReplication({
      epoch,
      extentBytes: this.config.extentBytes,
      inflightOpsMax: this.config.inflightOpsMax,
      inflightBytesMax: this.config.inflightBytesMax,
      seqWindowMax: this.config.seqWindowMax,
      peerRetriesMax: this.config.peerRetriesMax,
      hotExtents: hot,
    })
  }

  private primaryEndpoint(): Endpoint<PeerMessage> {
    return {
      onMessage: (from, message) => {
        if (!this.aliveA) return
        this.primaryReceive(from, message)
      },
      onLinkDown: () => {
        if (!this.aliveA) return
        this.trace('a: link down')
        this.onPrimary(this.primary.peerDisconnected())
        this.scheduleReconnect()
      },
      onLinkUp: () => {
        if (!this.aliveA) return
        this.trace('a: link up')
        this.onPrimary(this.primary.peerConnected())
      },
    }
  }

  private primaryReceive(from: string, m: PeerMessage): void {
    if (from !== secondaryName) return
    switch (m.type) {
      case 'ack':
        this.onPrimary(this.primary.peerAck(m))
        break
      case 'reject':
        this.trace(`a: reject s${m.seq} ${m.code}`)
        this.onPrimary(this.primary.peerError(m))
        break
      case 'flushAck':
        this.onPrimary(this.primary.peerFlushAck(m))
        break
      case 'rejectFlush':
        this.onPrimary(this.primary.peerFlushError(m))
        break
      case 'replicate':
      case 'flush':
        this.violate(`primary received ${m.type}`)
        break
    }
  }

  private scheduleReconnect(): void {
    if (this.reconnectPending || this.streamEnded) return
    this.reconnectPending = true
    const incarnation = this.incarnationA
    this.clockA.after(this.ioDelay(0.5, 20), 'reconnect', () => {
      this.reconnectPending = false
      if (!this.aliveA || incarnation !== this.incarnationA || this.streamEnded) return
      if (this.network.isUp(primaryName, secondaryName)) return
      if (!this.network.connect(primaryName, secondaryName)) this.scheduleReconnect()
    })
  }

  private onPrimary(effects: PrimaryEffect[]): void {
    for (const e of effects) this.primaryEffect(e)
    this.pumpBacklog()
  }

  private primaryEffect(e: PrimaryEffect): void {
    const incarnation = this.incarnationA
    const live = (): boolean => this.aliveA && incarnation === this.incarnationA
    switch (e.type) {
      case 'persistActivityLog': {
        this.count('alTx')
        this.trace(
          `a: persistActivityLog hot=[${e.extents.join(',')}] cold=[${e.coldExtents.join(',')}]`,
        )
        const batch = {
          put: e.extents.map((x): [string, string] => [`al:${x}`, 'hot']),
          del: e.coldExtents.map((x) => `al:${x}`),
        }
        const id = this.meta.write(batch, true)
        const tx = { extents: e.extents, coldExtents: e.coldExtents }
        this.clock.schedule(this.ioDelay(0.2, 3), 'al sync', () => {
          if (!live()) return
          this.meta.commit(id)
          this.onPrimary(this.primary.activityLogPersisted(tx))
        })
        break
      }
      case 'writeLocal': {
        this.trace(`a: writeLocal r${e.requestId} ${showOp(e)}`)
        this.checkHotAtIssue('a', e)
        const handle = this.diskA.write(e.offset, e.length, e.requestId)
        this.clock.schedule(this.ioDelay(0.02, 2), 'a disk write', () => {
          if (!live()) return
          this.diskA.complete(handle, e.fua)
          const request = this.requests.get(e.requestId)
          if (request !== undefined) request.doneA = this.clock.nowMs
          this.onPrimary(this.primary.localDone({ requestId: e.requestId, ok: true }))
        })
        break
      }
      case 'sendToPeer': {
        const { offset, length, fua, kind } = e
        const message: PeerMessage = {
          type: 'replicate',
          epoch: e.epoch,
          seq: e.seq,
          requestId: e.requestId,
          op: { offset, length, fua, kind },
        }
        if (!this.network.send(primaryName, secondaryName, message)) {
          this.violate(`sendToPeer s${e.seq} while the stream is down`)
        }
        break
      }
      case 'flushLocal': {
        const token: FlushToken = this.diskA.flushStart()
        const requestId = this.flushRequestOf.get(e.flushId)
        this.clock.schedule(this.ioDelay(0.3, 4), 'a fsync', () => {
          if (!live()) return
          this.diskA.flushDone(token)
          const request = requestId === undefined ? undefined : this.requests.get(requestId)
          if (request !== undefined) request.doneA = this.clock.nowMs
          this.onPrimary(this.primary.localFlushDone({ flushId: e.flushId, ok: true }))
        })
        break
      }
      case 'sendFlushToPeer': {
        const requestId = this.flushRequestOf.get(e.flushId) ?? 0
        const message: PeerMessage = {
          type: 'flush',
          epoch: e.epoch,
          flushId: e.flushId,
          requestId,
        }
        if (!this.network.send(primaryName, secondaryName, message)) {
          this.violate(`sendFlushToPeer f${e.flushId} while the stream is down`)
        }
        break
      }
      case 'disconnectPeer':
        this.trace(`a: disconnectPeer ${e.code}`)
        this.count('peerResets')
        this.network.disconnect(primaryName, secondaryName)
        break
      case 'reply':
        this.onReply(e.requestId, e.ok ? undefined : e.code)
        break
    }
  }

  /** Invariant: a write is issued only once every extent it touches is durably hot. */
  private checkHotAtIssue(node: string, op: { offset: number; length: number }): void {
    const hot = this.hotDurable()
    for (const extent of this.extentsOf(op.offset, op.length)) {
      if (!hot.has(extent)) {
        this.violate(
          `${node} writes ${op.offset}+${op.length} into extent ${extent}, not durably hot`,
        )
        return
      }
    }
  }

  // ---- invariant 2 (reply discipline) and the bookkeeping of acknowledged data

  private onReply(id: number, code: ReplicationCode | undefined): void {
    const request = this.requests.get(id)
    if (request === undefined) {
      this.violate(`reply for unknown request r${id}`)
      return
    }
    if (request.replied) {
      this.violate(`r${id} replied twice`)
      return
    }
    request.replied = true
    this.trace(`a: reply r${id} ${code ?? 'ok'}`)
    if (code !== undefined) {
      this.history.push({ atMs: this.clock.nowMs, type: 'reply', id, ok: false, code })
      this.count('replyErrors')
      // Nothing in this model can fail a request: no disk errors, no fencing (no epoch change).
      this.violate(`r${id} (${request.kind}) failed with ${code}`)
      return
    }
    this.history.push({ atMs: this.clock.nowMs, type: 'reply', id, ok: true })
    if (request.doneA === undefined || request.doneB === undefined) {
      const missing = request.doneA === undefined ? 'the primary' : 'the secondary'
      this.violate(`r${id} (${request.kind}) replied ok before ${missing} completed it`)
      return
    }
    const first = request.offset / sectorBytes
    const end = first + request.length / sectorBytes
    if (request.kind === 'flush') {
      this.count('flushOk')
      const covers = request.covers
      if (covers === undefined) return
      for (let i = 0; i < covers.length; i++) {
        const v = covers[i] ?? 0
        if (v > (this.mustSurvive[i] ?? 0)) this.mustSurvive[i] = v
      }
      return
    }
    this.count('writeOk')
    for (let i = first; i < end; i++) {
      if (id > (this.lastAcked[i] ?? 0)) this.lastAcked[i] = id
      if (request.fua && id > (this.mustSurvive[i] ?? 0)) this.mustSurvive[i] = id
    }
  }

  // ---- secondary node

  private newSecondary(): SecondaryReplication {
    return new SecondaryReplication({
      epoch,
      primary: primaryName,
      seqWindowMax: this.config.seqWindowMax,
    })
  }

  private secondaryEndpoint(): Endpoint<PeerMessage> {
    return {
      onMessage: (from, message) => {
        if (!this.aliveB) return
        this.secondaryReceive(from, message)
      },
      onLinkDown: () => undefined,
      onLinkUp: () => undefined,
    }
  }

  private secondaryReceive(from: string, m: PeerMessage): void {
    switch (m.type) {
      case 'replicate': {
        const checksumOk = !this.prngFaults.bool(this.config.checksumErrorRate)
        if (!checksumOk) this.count('checksumErrors')
        this.seqRequest.set(`${m.epoch}:${m.seq}`, m.requestId)
        this.onSecondary(
          this.secondary.receive({ ...m.op, epoch: m.epoch, seq: m.seq, from, checksumOk }),
        )
        break
      }
      case 'flush':
        this.seqRequest.set(`${m.epoch}:f${m.flushId}`, m.requestId)
        this.onSecondary(this.secondary.receiveFlush({ epoch: m.epoch, flushId: m.flushId, from }))
        break
      default:
        this.violate(`secondary received ${m.type}`)
    }
  }

  private onSecondary(effects: SecondaryEffect[]): void {
    const incarnation = this.incarnationB
    const live = (): boolean => this.aliveB && incarnation === this.incarnationB
    for (const e of effects) {
      switch (e.type) {
        case 'writeLocal': {
          const requestId = this.seqRequest.get(`${e.epoch}:${e.seq}`)
          if (requestId === undefined) {
            this.violate(`secondary writes unknown seq ${e.seq}`)
            return
          }
          this.trace(`b: writeLocal s${e.seq} r${requestId} ${showOp(e)}`)
          this.checkHotAtIssue('b', e)
          const handle = this.diskB.write(e.offset, e.length, requestId)
          this.clock.schedule(this.ioDelay(0.02, 2), 'b disk write', () => {
            if (!live()) return
            this.diskB.complete(handle, e.fua)
            const request = this.requests.get(requestId)
            if (request !== undefined) request.doneB = this.clock.nowMs
            this.onSecondary(this.secondary.localDone({ epoch: e.epoch, seq: e.seq, ok: true }))
          })
          break
        }
        case 'flushLocal': {
          const requestId = this.seqRequest.get(`${e.epoch}:f${e.flushId}`)
          const token = this.diskB.flushStart()
          this.clock.schedule(this.ioDelay(0.3, 4), 'b fsync', () => {
            if (!live()) return
            this.diskB.flushDone(token)
            const request = requestId === undefined ? undefined : this.requests.get(requestId)
            if (request !== undefined) request.doneB = this.clock.nowMs
            this.onSecondary(
              this.secondary.localFlushDone({ epoch: e.epoch, flushId: e.flushId, ok: true }),
            )
          })
          break
        }
        default:
          if (e.type === 'reject' || e.type === 'rejectFlush') this.trace(`b: ${e.type} ${e.code}`)
          this.network.send(secondaryName, primaryName, e) // lost if the stream is down
      }
    }
  }

  // ---- clients

  private scheduleArrival(): void {
    const delay = -Math.log(1 - this.prngWorkload.next()) * this.config.interArrivalMsMean
    this.clock.schedule(delay, 'client arrival', () => {
      if (this.winding) return
      this.newRequest()
      this.scheduleArrival()
    })
  }

  private newRequest(): void {
    if (!this.aliveA) return // no client connection while the primary is down
    const p = this.prngWorkload
    const { mix: weights, sizeBytes, opBytesMax } = this.config
    const total = weights.read + weights.write + weights.trim + weights.zero + weights.flush
    let roll = p.next() * total
    let kind: RequestKind = 'flush'
    for (const k of ['read', 'write', 'trim', 'zero'] as const) {
      if (roll < weights[k]) {
        kind = k
        break
      }
      roll -= weights[k]
    }
    let offset = 0
    let length = 0
    if (kind !== 'flush') {
      length = sectorBytes * (1 + p.int(opBytesMax / sectorBytes))
      offset = sectorBytes * p.int((sizeBytes - length) / sectorBytes + 1)
    }
    const fua = kind !== 'read' && kind !== 'flush' && p.bool(this.config.fuaRate)
    const request: ClientRequest = {
      id: this.nextRequestId++,
      kind,
      offset,
      length,
      fua,
      startMs: this.clock.nowMs,
      incarnation: this.incarnationA,
      replied: false,
      doneA: undefined,
      doneB: undefined,
      covers: undefined,
      floor: undefined,
    }
    if (kind === 'read') {
      const first = offset / sectorBytes
      request.floor = this.lastAcked.slice(first, first + length / sectorBytes)
    } else if (kind !== 'flush') {
      this.kindOf.set(request.id, kind)
    }
    this.requests.set(request.id, request)
    this.history.push({
      atMs: this.clock.nowMs,
      type: 'start',
      id: request.id,
      kind,
      offset,
      length,
      fua,
    })
    this.count(`req.${kind}`)
    this.backlog.push(request)
    this.pumpBacklog()
  }

  /** Admits backlog requests in FIFO order while the core allows. */
  private pumpBacklog(): void {
    while (this.aliveA) {
      const request = this.backlog[0]
      if (request === undefined) return
      if (request.kind === 'read') {
        this.backlog.shift()
        this.startRead(request)
        continue
      }
      const admitLength = request.kind === 'flush' ? 0 : request.length
      if (!this.primary.canAdmit({ kind: request.kind, length: admitLength })) return
      this.backlog.shift()
      if (request.kind === 'flush') {
        request.covers = this.lastAcked.slice()
        const effects = this.primary.clientFlush({ requestId: request.id })
        const first = effects.find((e) => e.type === 'flushLocal')
        if (first !== undefined) this.flushRequestOf.set(first.flushId, request.id)
        this.trace(`a: clientFlush r${request.id}`)
        for (const e of effects) this.primaryEffect(e)
      } else {
        const { id: requestId, offset, length, fua, kind } = request
        this.trace(`a: client r${requestId} ${kind}@${offset}+${length}${fua ? ' fua' : ''}`)
        const effects = this.primary.clientWrite({ requestId, offset, length, fua, kind })
        for (const e of effects) this.primaryEffect(e)
      }
    }
  }

  /** Reads are served by the primary's local disk (cache); checked against invariant 5. */
  private startRead(request: ClientRequest): void {
    const incarnation = this.incarnationA
    this.clock.schedule(this.ioDelay(0.02, 1), 'a disk read', () => {
      if (!this.aliveA || incarnation !== this.incarnationA) return
      const data = this.diskA.read(request.offset, request.length)
      request.replied = true
      this.history.push({ atMs: this.clock.nowMs, type: 'reply', id: request.id, ok: true })
      this.count('readOk')
      const floor = request.floor
      if (floor === undefined) return
      for (let i = 0; i < data.length; i++) {
        const got = data[i] ?? 0
        const atLeast = floor[i] ?? 0
        // Versions of overlapping writes grow in arrival order, so "the last acknowledged write
        // or a newer, concurrent one" is "a version >= the floor".
        if (got < atLeast) {
          const sector = request.offset / sectorBytes + i
          this.violate(`stale read r${request.id}: sector ${sector} has r${got}, acked r${atLeast}`)
          return
        }
      }
    })
  }

  // ---- activity-log cooling

  private scheduleCooling(): void {
    const incarnation = this.incarnationA
    this.clockA.after(this.config.coolEveryMs * (0.5 + this.prngIo.next()), 'cool', () => {
      if (this.winding || incarnation !== this.incarnationA) return
      if (this.aliveA) {
        const coolable = this.primary
          .coolable()
          .filter((x) => this.config.coolLoadedExtents || !this.loadedHot.has(x))
          .filter(() => this.prngIo.bool(0.7))
        if (coolable.length > 0) {
          this.count('cools')
          this.trace(`a: coolExtents [${coolable.join(',')}]`)
          this.onPrimary(this.primary.coolExtents({ extents: coolable }))
        }
        this.scheduleCooling()
      }
    })
  }

  // ---- faults

  private scheduleFaults(): void {
    const rates = this.config.faults
    for (const name of Object.keys(rates) as (keyof FaultRates)[]) {
      if (rates[name] > 0) this.scheduleFault(name, rates[name])
    }
  }

  private scheduleFault(name: keyof FaultRates, perSecond: number): void {
    const delay = (-Math.log(1 - this.prngFaults.next()) * 1000) / perSecond
    this.clock.schedule(delay, `fault ${name}`, () => {
      if (this.winding) return
      this.fault(name)
      this.scheduleFault(name, perSecond)
    })
  }

  private fault(name: keyof FaultRates): void {
    const p = this.prngFaults
    switch (name) {
      case 'disconnect':
        if (!this.network.isUp(primaryName, secondaryName)) return
        this.note('disconnect')
        this.network.disconnect(primaryName, secondaryName)
        break
      case 'partition': {
        if (this.network.isPartitioned(primaryName, secondaryName)) return
        this.note('partition')
        this.network.partition(primaryName, secondaryName)
        this.clock.schedule(1 + p.next() * 40, 'heal', () => {
          this.note('heal')
          this.network.heal(primaryName, secondaryName)
        })
        break
      }
      case 'spike':
        this.note('spike')
        this.network.spike(5 + p.next() * 50, 5 + p.next() * 40)
        break
      case 'secondaryCrash':
        if (!this.aliveB) return
        this.crash(false, true)
        break
      case 'primaryCrash':
        if (!this.aliveA) return
        this.crash(true, false)
        break
      case 'powerLoss':
        if (!this.aliveA && !this.aliveB) return
        this.crash(this.aliveA, this.aliveB)
        break
    }
  }

  private note(what: string): void {
    this.count(`fault.${what}`)
    this.trace(`FAULT ${what}`)
    this.history.push({ atMs: this.clock.nowMs, type: 'fault', what })
  }

  private crash(a: boolean, b: boolean): void {
    this.note(a && b ? 'powerLoss' : a ? 'primaryCrash' : 'secondaryCrash')
    this.crashes += 1
    this.streamEnded = true
    if (a) {
      this.aliveA = false
      this.incarnationA += 1
      this.diskA.crash()
      this.meta.crash()
      for (const request of this.requests.values()) {
        if (!request.replied && request.incarnation === this.incarnationA - 1) {
          request.replied = true
          this.history.push({ atMs: this.clock.nowMs, type: 'lost', id: request.id })
        }
      }
      this.backlog = []
    }
    if (b) {
      this.aliveB = false
      this.incarnationB += 1
      this.diskB.crash()
    }
    this.network.disconnect(primaryName, secondaryName)
    this.checkCrash(a, b)
    const p = this.prngFaults
    if (a)
      this.clock.schedule(1 + p.next() * 30, 'restart a', () => {
        this.restartPrimary()
      })
    if (b)
      this.clock.schedule(1 + p.next() * 30, 'restart b', () => {
        this.restartSecondary()
      })
  }

  private restartPrimary(): void {
    const hot = [...this.hotDurable()].sort((x, y) => x - y)
    this.trace(`a: restart, hot=[${hot.join(',')}]`)
    this.primary = this.newPrimary(hot)
    this.loadedHot = new Set(hot)
    this.aliveA = true
    // What the restarted primary holds is the new floor for reads (invariant 1 checked it).
    this.lastAcked.set(this.diskA.durable)
    this.scheduleCooling()
  }

  private restartSecondary(): void {
    this.trace('b: restart')
    this.secondary = this.newSecondary()
    this.seqRequest = new Map()
    this.aliveB = true
  }

  // ---- invariants 1 and 3, after a crash

  private checkCrash(a: boolean, b: boolean): void {
    // 1. Every write acknowledged durable (FUA, or before an acknowledged flush) survives on both.
    for (const [name, disk] of [
      ['a', this.diskA],
      ['b', this.diskB],
    ] as const) {
      for (let i = 0; i < disk.sectors; i++) {
        const must = this.mustSurvive[i] ?? 0
        const got = disk.durable[i] ?? 0
        if (got < must) {
          this.violate(
            `lost write: ${name} sector ${i} holds r${got} after the crash, r${must} was durable`,
          )
          return
        }
      }
    }
    // 3. Where the replicas may differ, the persisted activity log has the extent hot.
    const states: [string, Uint32Array][] = a
      ? [['a.durable', this.diskA.durable]]
      : [
          ['a.durable', this.diskA.durable],
          ['a.cache', this.diskA.cache],
        ]
    const other: [string, Uint32Array][] = b
      ? [['b.durable', this.diskB.durable]]
      : [
          ['b.durable', this.diskB.durable],
          ['b.cache', this.diskB.cache],
        ]
    this.checkCoverage(states, other, `after the crash of ${a && b ? 'both' : a ? 'a' : 'b'}`)
  }

  private checkCoverage(
    left: [string, Uint32Array][],
    right: [string, Uint32Array][],
    when: string,
  ): void {
    const hot = this.hotDurable()
    const sectorsPerExtent = this.config.extentBytes / sectorBytes
    for (const [ln, l] of left) {
      for (const [rn, r] of right) {
        for (let i = 0; i < l.length; i++) {
          if (this.contentOf(l[i] ?? 0) === this.contentOf(r[i] ?? 0)) continue
          const extent = Math.floor(i / sectorsPerExtent)
          if (!hot.has(extent)) {
            this.violate(
              `${when}: ${ln} r${l[i]} and ${rn} r${r[i]} differ at sector ${i}, extent ${extent} is cold in the persisted activity log [${[...hot].join(',')}]`,
            )
            return
          }
        }
      }
    }
  }

  // ---- the end: quiescence

  private windDown(): void {
    this.winding = true
    this.trace('horizon: clients and faults stop')
    this.network.heal(primaryName, secondaryName)
    this.network.spike(0, 0)
    if (!this.streamEnded && this.aliveA && !this.network.isUp(primaryName, secondaryName)) {
      this.scheduleReconnect()
    }
  }

  private finish(): void {
    if (this.crashes > 0) {
      // The replicas may differ only inside hot extents, whatever crashes next.
      const both = (disk: SimDisk, n: string): [string, Uint32Array][] => [
        [`${n}.durable`, disk.durable],
        [`${n}.cache`, disk.cache],
      ]
      this.checkCoverage(both(this.diskA, 'a'), both(this.diskB, 'b'), 'at the end')
      this.count('runsWithCrash')
      return
    }
    // 4. No crash: every request answered ok, and after a final flush both disks are identical.
    this.winding = false
    const flush: ClientRequest = {
      id: this.nextRequestId++,
      kind: 'flush',
      offset: 0,
      length: 0,
      fua: false,
      startMs: this.clock.nowMs,
      incarnation: this.incarnationA,
      replied: false,
      doneA: undefined,
      doneB: undefined,
      covers: undefined,
      floor: undefined,
    }
    this.winding = true
    this.requests.set(flush.id, flush)
    this.backlog.push(flush)
    this.pumpBacklog()
    this.drain()
    if (this.violations.length > 0) return
    for (const request of this.requests.values()) {
      if (!request.replied) {
        this.violate(`r${request.id} (${request.kind}) never answered`)
        return
      }
    }
    if (this.primary.inflightOps !== 0) {
      this.violate('primary still has requests in flight')
      return
    }
    for (let i = 0; i < this.diskA.sectors; i++) {
      const a = this.contentOf(this.diskA.durable[i] ?? 0)
      const b = this.contentOf(this.diskB.durable[i] ?? 0)
      if (a !== b || this.diskA.cache[i] !== this.diskA.durable[i]) {
        this.violate(`after quiescence the replicas differ at sector ${i}: r${a} vs r${b}`)
        return
      }
    }
    this.count('runsIdentical')
  }
}

function showOp(o: BlockOp): string {
  return `${o.kind}@${o.offset}+${o.length}${o.fua ? ' fua' : ''}`
}

function prefixed(prefix: string, values: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {}
  for (const [k, v] of Object.entries(values)) out[prefix + k] = v
  return out
}

/** A sub-seed per component, so adding draws in one does not reshuffle the others. */
export function mix(seed: number, stream: number): number {
  let h = (seed ^ Math.imul(stream, 0x9e3779b1)) >>> 0
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b)
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35)
  return (h ^ (h >>> 16)) >>> 0
}

export function simulate(config: SimConfig): SimResult {
  return new Cluster(config).run()
}
