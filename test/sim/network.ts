/**
 * A simulated network between named nodes, driven by the simulated clock.
 *
 * - Streams: one reliable, ordered stream per pair of nodes (the replication link is TCP-like).
 *   While it is up, messages arrive in FIFO order after a random delay (plus any delay spike).
 *   It can BREAK: `disconnect` drops everything in flight on it and tells both ends
 *   (`onLinkDown`); a later `connect` starts a new stream generation (`onLinkUp`). Loss inside a
 *   stream is never modelled: the protocol relies on the stream being reliable.
 * - Partitions: `partition(a, b)` breaks the pair's stream and refuses `connect` until `heal`.
 * - Duplicates: on a reconnect the new stream may first re-deliver a random subset of messages
 *   already delivered on the previous generation (in their original order), as a transport that
 *   replays its last window would; the protocol is idempotent per (epoch, seq).
 * - Datagrams: `sendDatagram` may be dropped with `datagramDropRate` (for the witness's RPCs,
 *   which tolerate loss), and are not ordered.
 */
import type { SimClock } from './clock.js'
import type { Prng } from '../lib/prng.js'

export interface Endpoint<M> {
  onMessage(from: string, message: M): void
  onLinkDown(peer: string): void
  onLinkUp(peer: string): void
}

export interface NetworkOptions {
  delayMsMin: number
  delayMsMax: number
  /** Probability that a reconnect replays part of the previous generation's deliveries. */
  duplicateRate: number
  datagramDropRate: number
  /** How many delivered messages per direction are remembered for replays. */
  replayWindow: number
}

interface Direction<M> {
  lastArrivalMs: number
  delivered: M[]
}

interface Link<M> {
  up: boolean
  partitioned: boolean
  generation: number
  directions: Map<string, Direction<M>>
}

export interface NetworkStats {
  sent: number
  delivered: number
  droppedInFlight: number
  disconnects: number
  connects: number
  duplicates: number
  datagramsDropped: number
}

export class SimNetwork<M> {
  readonly stats: NetworkStats = {
    sent: 0,
    delivered: 0,
    droppedInFlight: 0,
    disconnects: 0,
    connects: 0,
    duplicates: 0,
    datagramsDropped: 0,
  }
  private readonly endpoints = new Map<string, Endpoint<M>>()
  private readonly links = new Map<string, Link<M>>()
  private spikeUntilMs = 0
  private spikeExtraMsMax = 0
  private inFlight = 0

  constructor(
    private readonly clock: SimClock,
    private readonly prng: Prng,
    private readonly options: NetworkOptions,
  ) {}

  register(name: string, endpoint: Endpoint<M>): void {
    this.endpoints.set(name, endpoint)
  }

  isUp(a: string, b: string): boolean {
    return this.link(a, b).up
  }

  isPartitioned(a: string, b: string): boolean {
    return this.link(a, b).partitioned
  }

  /** Opens a new stream generation; false if partitioned or already up. */
  connect(a: string, b: string): boolean {
    const link = this.link(a, b)
    if (link.up || link.partitioned) return false
    link.up = true
    link.generation += 1
    this.stats.connects += 1
    const replay = this.prng.bool(this.options.duplicateRate)
    for (const [from, direction] of link.directions) {
      const old = direction.delivered.splice(0)
      if (!replay) continue
      const to = from === a ? b : a
      for (const message of old) {
        if (!this.prng.bool(0.5)) continue
        this.stats.duplicates += 1
        this.enqueue(link, from, to, message, false)
      }
    }
    this.endpointOf(a).onLinkUp(b)
    this.endpointOf(b).onLinkUp(a)
    return true
  }

  /** Breaks the stream: in-flight messages are lost; both ends hear `onLinkDown`. */
  disconnect(a: string, b: string): void {
    const link = this.link(a, b)
    if (!link.up) return
    link.up = false
    link.generation += 1
    this.stats.disconnects += 1
    this.endpointOf(a).onLinkDown(b)
    this.endpointOf(b).onLinkDown(a)
  }

  partition(a: string, b: string): void {
    this.link(a, b).partitioned = true
    this.disconnect(a, b)
  }

  heal(a: string, b: string): void {
    this.link(a, b).partitioned = false
  }

  /** Extra random delay up to `extraMsMax` for messages sent in the next `durationMs`. */
  spike(durationMs: number, extraMsMax: number): void {
    this.spikeUntilMs = this.clock.nowMs + durationMs
    this.spikeExtraMsMax = extraMsMax
  }

  /** Sends on the pair's stream; false (and nothing sent) when the stream is down. */
  send(from: string, to: string, message: M): boolean {
    const link = this.link(from, to)
    if (!link.up) return false
    this.stats.sent += 1
    this.enqueue(link, from, to, message, true)
    return true
  }

  /** An unordered, lossy message (no stream needed, but not across a partition). */
  sendDatagram(from: string, to: string, message: M): void {
    const link = this.link(from, to)
    if (link.partitioned || this.prng.bool(this.options.datagramDropRate)) {
      this.stats.datagramsDropped += 1
      return
    }
    this.clock.schedule(this.delayMs(), `datagram ${from}->${to}`, () => {
      this.endpointOf(to).onMessage(from, message)
    })
  }

  /** Messages scheduled and not yet delivered or dropped. */
  get pendingMessages(): number {
    return this.inFlight
  }

  private enqueue(link: Link<M>, from: string, to: string, message: M, remember: boolean): void {
    const direction = this.direction(link, from)
    const arrivalMs = Math.max(this.clock.nowMs + this.delayMs(), direction.lastArrivalMs)
    direction.lastArrivalMs = arrivalMs
    const generation = link.generation
    this.inFlight += 1
    this.clock.schedule(arrivalMs - this.clock.nowMs, `deliver ${from}->${to}`, () => {
      this.inFlight -= 1
      if (!link.up || link.generation !== generation) {
        this.stats.droppedInFlight += 1
        return
      }
      this.stats.delivered += 1
      if (remember) {
        direction.delivered.push(message)
        if (direction.delivered.length > this.options.replayWindow) direction.delivered.shift()
      }
      this.endpointOf(to).onMessage(from, message)
    })
  }

  private delayMs(): number {
    const { delayMsMin, delayMsMax } = this.options
    let delay = delayMsMin + this.prng.next() * (delayMsMax - delayMsMin)
    if (this.clock.nowMs < this.spikeUntilMs) delay += this.prng.next() * this.spikeExtraMsMax
    return delay
  }

  private link(a: string, b: string): Link<M> {
    const key = a < b ? `${a}|${b}` : `${b}|${a}`
    let link = this.links.get(key)
    if (link === undefined) {
      link = { up: false, partitioned: false, generation: 0, directions: new Map() }
      this.links.set(key, link)
    }
    return link
  }

  private direction(link: Link<M>, from: string): Direction<M> {
    let direction = link.directions.get(from)
    if (direction === undefined) {
      direction = { lastArrivalMs: 0, delivered: [] }
      link.directions.set(from, direction)
    }
    return direction
  }

  private endpointOf(name: string): Endpoint<M> {
    const endpoint = this.endpoints.get(name)
    if (endpoint === undefined) throw new Error(`unknown node ${name}`)
    return endpoint
  }
}
