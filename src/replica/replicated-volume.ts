/**
 * Drivers of synchronous replication: they run the pure cores of replication.ts against real I/O.
 *
 * - `PrimaryVolume` is the `BlockDevice` NBD clients use on the primary's node. Writes, trims,
 *   zeroes and flushes become core events; the core's effects become local volume I/O, sends on
 *   the peer stream and activity-log transactions; completions and acks are fed back as events.
 *   A request's promise settles only on the core's `reply`, i.e. after BOTH replicas are done.
 *   Reads, cache and block status are served by the local replica.
 * - `SecondaryVolume` is the secondary's side of the stream: it applies what the primary sends
 *   through its `SecondaryReplication` core and acks.
 *
 * Events are queued and handled one at a time, so an effect whose handler calls back
 * synchronously (a stream closing while we send) never re-enters the core.
 *
 * Peer connection (primary): the driver keeps one stream open, reconnecting with backoff. After a
 * reconnect to the SAME peer incarnation it reports `peerConnected` and the core re-sends what
 * was not acknowledged. A different incarnation means the peer process restarted and may have
 * lost writes it had acknowledged but not flushed: re-sending is not enough, the hot extents
 * need a resync (issue 4). Until then the volume refuses to acknowledge writes (they fail with
 * IO_ERROR, saying why): it never pretends the replicas are in sync.
 */
import { assert, unreachable } from '../core/assert.js'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { AllocationExtent, BlockDevice, ExportInfo, ZeroOptions } from '../nbd/exports.js'
import type { ActivityLog } from './activity-log.js'
import type {
  HelloDecision,
  LinkClosed,
  PeerLinkClient,
  PeerReplies,
  PeerStream,
  ReceivedOp,
} from './peer-link.js'
import type { Hello } from './peer-messages.js'
import { PrimaryReplication, SecondaryReplication } from './replication.js'
import type {
  BlockOp,
  NodeId,
  OpKind,
  PrimaryCounters,
  PrimaryEffect,
  PrimaryEvent,
  ReplicationCode,
  RequestId,
  SecondaryEffect,
  SecondaryEvent,
} from './replication.js'
import type { Volume } from './volume.js'

/** Reconnect backoff bounds for the primary's peer stream. */
const reconnectDelayMsMin = 100
const reconnectDelayMsMax = 2000

/** Runs events through a handler one at a time, in order, even when handlers enqueue more. */
class EventQueue<E> {
  private readonly queue: E[] = []
  private running = false
  constructor(private readonly handle: (event: E) => void) {}
  push(event: E): void {
    this.queue.push(event)
    if (this.running) return
    this.running = true
    try {
      for (let next = this.queue.shift(); next !== undefined; next = this.queue.shift()) {
        this.handle(next)
      }
    } finally {
      this.running = false
    }
  }
}

function replicationFailure(code: ReplicationCode, volume: string): DuplexError {
  return new DuplexError('IO_ERROR', `replication of volume ${volume} failed: ${code}`)
}

interface PendingRequest {
  resolve: () => void
  reject: (error: Error) => void
  kind: OpKind | 'flush'
  data: Buffer | undefined
  zero: ZeroOptions | undefined
}

export interface PrimaryVolumeOptions {
  local: Volume
  activityLog: ActivityLog
  epoch: number
  nodeName: NodeId
  /** The secondary's replication endpoint, HOST:PORT. */
  peerAddress: string
  client: PeerLinkClient
  incarnation: Buffer
  log: Logger
}

export class PrimaryVolume implements BlockDevice {
  readonly info: ExportInfo
  private readonly core: PrimaryReplication
  private readonly events: EventQueue<PrimaryEvent>
  private readonly requests = new Map<RequestId, PendingRequest>()
  private readonly admitWaiters: (() => void)[] = []
  private nextRequestId = 1
  private stream: PeerStream | undefined
  private peerIncarnation: Buffer | undefined
  private needsResync: string | undefined
  private closing = false
  private reconnectDelayMs = reconnectDelayMsMin
  private reconnectTimer: NodeJS.Timeout | undefined

  private constructor(
    private readonly options: PrimaryVolumeOptions,
    hotExtents: number[],
  ) {
    this.info = options.local.info
    this.core = new PrimaryReplication({ epoch: options.epoch, hotExtents })
    this.events = new EventQueue((event) => {
      this.perform(this.core.step(event))
    })
  }

  /** Loads the persisted activity log and starts connecting to the secondary. */
  static async start(options: PrimaryVolumeOptions): Promise<PrimaryVolume> {
    const volume = new PrimaryVolume(options, await options.activityLog.hotExtents())
    volume.connect()
    return volume
  }

  get connected(): boolean {
    return this.core.isConnected
  }

  get counters(): Readonly<PrimaryCounters> {
    return this.core.counters
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return this.options.local.read(offset, length)
  }

  cache(offset: number, length: number): Promise<void> {
    return this.options.local.cache(offset, length)
  }

  allocation(offset: number, length: number, extentsMax: number): Promise<AllocationExtent[]> {
    return this.options.local.allocation(offset, length, extentsMax)
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'write', offset, length: data.length, fua }, data, undefined)
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.mutate({ kind: 'trim', offset, length, fua }, undefined, undefined)
  }

  zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    if (options.noHole && options.fastZero) {
      // Same answer as the local store would give, before touching either replica.
      return Promise.reject(
        new DuplexError('NOT_SUPPORTED', 'fast zeroing without punching holes is not supported'),
      )
    }
    return this.mutate({ kind: 'zero', offset, length, fua: options.fua }, undefined, options)
  }

  async flush(): Promise<void> {
    await this.admitted('flush', 0)
    return new Promise((resolve, reject) => {
      const requestId = this.nextRequestId++
      this.requests.set(requestId, {
        resolve,
        reject,
        kind: 'flush',
        data: undefined,
        zero: undefined,
      })
      this.events.push({ type: 'clientFlush', requestId })
    })
  }

  /** Stops reconnecting and closes the stream; requests still pending fail. */
  close(): void {
    this.closing = true
    clearTimeout(this.reconnectTimer)
    this.stream?.close('SHUTTING_DOWN', 'volume closing')
    for (const [, request] of this.requests) {
      request.reject(new DuplexError('SHUTTING_DOWN', `volume ${this.info.name} is closing`))
    }
    this.requests.clear()
  }

  private async mutate(
    op: BlockOp,
    data: Buffer | undefined,
    zero: ZeroOptions | undefined,
  ): Promise<void> {
    if (this.needsResync !== undefined) throw new DuplexError('IO_ERROR', this.needsResync)
    await this.admitted(op.kind, op.length)
    return new Promise((resolve, reject) => {
      const requestId = this.nextRequestId++
      this.requests.set(requestId, { resolve, reject, kind: op.kind, data, zero })
      this.events.push({ type: 'clientWrite', requestId, ...op })
    })
  }

  /** Back-pressure: waits until the core can take one more request of this size. */
  private async admitted(kind: OpKind | 'flush', length: number): Promise<void> {
    while (!this.core.canAdmit({ kind, length })) {
      await new Promise<void>((resolve) => this.admitWaiters.push(resolve))
    }
  }

  private wakeAdmitWaiters(): void {
    for (const wake of this.admitWaiters.splice(0)) wake()
  }

  private perform(effects: PrimaryEffect[]): void {
    for (const effect of effects) this.performOne(effect)
  }

  private performOne(effect: PrimaryEffect): void {
    switch (effect.type) {
      case 'persistActivityLog':
        this.options.activityLog.persist(effect.extents, effect.coldExtents).then(
          () => {
            this.events.push({
              type: 'activityLogPersisted',
              extents: effect.extents,
              coldExtents: effect.coldExtents,
            })
          },
          (error: unknown) => {
            this.fail(
              `activity log of ${this.info.name} cannot be persisted: ${errorMessage(error)}`,
            )
          },
        )
        return
      case 'writeLocal':
        this.applyLocal(effect.requestId, effect)
        return
      case 'sendToPeer': {
        const request = this.requests.get(effect.requestId)
        const stream = this.stream
        if (stream === undefined || !stream.isOpen) return // re-sent after peerConnected
        stream.sendOp(
          {
            epoch: effect.epoch,
            seq: effect.seq,
            kind: effect.kind,
            offset: effect.offset,
            length: effect.length,
            fua: effect.fua,
            noHole: request?.zero?.noHole ?? false,
          },
          request?.data ?? Buffer.alloc(0),
        )
        return
      }
      case 'flushLocal':
        this.options.local.flush().then(
          () => {
            this.events.push({ type: 'localFlushDone', flushId: effect.flushId, ok: true })
          },
          (error: unknown) => {
            this.options.log.error('local flush failed', { error: errorMessage(error) })
            this.events.push({ type: 'localFlushDone', flushId: effect.flushId, ok: false })
          },
        )
        return
      case 'sendFlushToPeer':
        if (this.stream?.isOpen === true) this.stream.sendFlush(effect.epoch, effect.flushId)
        return
      case 'disconnectPeer':
        this.options.log.warn('dropping the peer stream', { code: effect.code })
        this.stream?.close('RESET', effect.code)
        return
      case 'reply':
        this.settle(effect.requestId, effect.ok ? undefined : effect.code)
        return
      default:
        unreachable(effect)
    }
  }

  private applyLocal(requestId: RequestId, op: BlockOp): void {
    const request = this.requests.get(requestId)
    assert(request !== undefined, `writeLocal for unknown request ${requestId}`)
    const local = this.options.local
    let done: Promise<void>
    switch (op.kind) {
      case 'write':
        assert(request.data !== undefined, 'write without data')
        done = local.write(op.offset, request.data, op.fua)
        break
      case 'trim':
        done = local.trim(op.offset, op.length, op.fua)
        break
      case 'zero':
        done = local.zero(
          op.offset,
          op.length,
          request.zero ?? { fua: op.fua, noHole: false, fastZero: false },
        )
        break
      default:
        unreachable(op.kind)
    }
    done.then(
      () => {
        this.events.push({ type: 'localDone', requestId, ok: true })
      },
      (error: unknown) => {
        this.options.log.error('local write failed', { error: errorMessage(error) })
        this.events.push({ type: 'localDone', requestId, ok: false })
      },
    )
  }

  private settle(requestId: RequestId, code: ReplicationCode | undefined): void {
    const request = this.requests.get(requestId)
    if (request === undefined) return
    this.requests.delete(requestId)
    if (code === undefined) request.resolve()
    else request.reject(replicationFailure(code, this.info.name))
    this.wakeAdmitWaiters()
  }

  /** Nothing safe is left to do for this volume: fail everything, acknowledge nothing more. */
  private fail(reason: string): void {
    this.options.log.error('replicated volume failed', { reason })
    this.needsResync = reason
    for (const [, request] of this.requests) request.reject(new DuplexError('IO_ERROR', reason))
    this.requests.clear()
    this.wakeAdmitWaiters()
  }

  private connect(): void {
    if (this.closing) return
    const { client, peerAddress, nodeName, epoch, incarnation, log } = this.options
    client
      .openStream(
        { volume: this.info.name, epoch, fromNode: nodeName, incarnation },
        {
          onAck: (e, seq) => {
            this.events.push({ type: 'peerAck', epoch: e, seq })
          },
          onFlushAck: (e, flushId) => {
            this.events.push({ type: 'peerFlushAck', epoch: e, flushId })
          },
          onReject: (e, seq, code) => {
            this.events.push({ type: 'peerError', epoch: e, seq, code })
          },
          onRejectFlush: (e, flushId, code) => {
            this.events.push({ type: 'peerFlushError', epoch: e, flushId, code })
          },
          onClosed: (reason) => {
            this.onStreamClosed(reason)
          },
          onDrained: () => {
            this.wakeAdmitWaiters()
          },
        },
      )
      .then(
        (stream) => {
          this.onStreamOpen(stream)
        },
        (error: unknown) => {
          log.debug('peer stream not open; retrying', {
            peer: peerAddress,
            error: errorMessage(error),
          })
          this.scheduleReconnect()
        },
      )
  }

  private onStreamOpen(stream: PeerStream): void {
    const ack = stream.helloAck
    assert(ack !== undefined, 'stream open without HelloAck')
    if (this.closing) {
      stream.close('SHUTTING_DOWN', 'volume closing')
      return
    }
    if (this.peerIncarnation !== undefined && !ack.incarnation.equals(this.peerIncarnation)) {
      stream.close('RESET', 'peer restarted')
      this.fail(
        `the secondary of ${this.info.name} restarted and may have lost unflushed writes; ` +
          'the replicas need a resync before writes can be acknowledged again',
      )
      return
    }
    this.peerIncarnation = ack.incarnation
    this.stream = stream
    this.reconnectDelayMs = reconnectDelayMsMin
    this.options.log.info('peer stream open', {
      volume: this.info.name,
      peer: this.options.peerAddress,
    })
    this.events.push({ type: 'peerConnected' })
  }

  private onStreamClosed(reason: LinkClosed): void {
    if (this.stream === undefined) return
    this.stream = undefined
    this.options.log.warn('peer stream closed', {
      volume: this.info.name,
      code: reason.code,
      why: reason.message,
    })
    this.events.push({ type: 'peerDisconnected' })
    this.scheduleReconnect()
  }

  private scheduleReconnect(): void {
    if (this.closing || this.needsResync !== undefined) return
    clearTimeout(this.reconnectTimer)
    this.reconnectTimer = setTimeout(() => {
      this.connect()
    }, this.reconnectDelayMs)
    this.reconnectDelayMs = Math.min(this.reconnectDelayMs * 2, reconnectDelayMsMax)
  }
}

export interface SecondaryVolumeOptions {
  local: Volume
  epoch: number
  primary: NodeId
  log: Logger
}

/** The secondary's side: applies the primary's stream through the SecondaryReplication core. */
export class SecondaryVolume {
  private readonly core: SecondaryReplication
  private readonly events: EventQueue<SecondaryEvent>
  /** Payloads of ops being applied, by epoch and seq (the core's effects carry no data). */
  private readonly payloads = new Map<string, { data: Buffer; noHole: boolean }>()
  private replies: PeerReplies | undefined

  constructor(private readonly options: SecondaryVolumeOptions) {
    this.core = new SecondaryReplication({ epoch: options.epoch, primary: options.primary })
    this.events = new EventQueue((event) => {
      this.perform(this.core.step(event))
    })
  }

  get name(): string {
    return this.options.local.name
  }

  /** Decides on a new stream from the primary (PeerLinkServer's onStream, for this volume). */
  accept(hello: Hello, replies: PeerReplies): HelloDecision {
    if (hello.epoch < this.core.epoch) {
      return {
        type: 'reject',
        code: 'EPOCH_STALE',
        message: `epoch ${hello.epoch} is stale`,
        epoch: this.core.epoch,
      }
    }
    if (hello.epoch > this.core.epoch) {
      return {
        type: 'reject',
        code: 'EPOCH_AHEAD',
        message: `epoch ${hello.epoch} is unknown here`,
        epoch: this.core.epoch,
      }
    }
    if (hello.fromNode !== this.core.primary) {
      return {
        type: 'reject',
        code: 'WRONG_SENDER',
        message: `${hello.fromNode} is not the primary of ${this.name} (${this.core.primary} is)`,
        epoch: this.core.epoch,
      }
    }
    this.replies?.close('REPLACED', 'a newer stream from the primary replaced this one')
    this.replies = replies
    return {
      type: 'accept',
      epoch: this.core.epoch,
      appliedSeq: this.core.appliedWatermark,
      handler: {
        onOp: (op) => {
          this.receive(hello.fromNode, op)
        },
        onFlush: (flush) => {
          this.events.push({
            type: 'receiveFlush',
            epoch: flush.epoch,
            flushId: flush.flushId,
            from: hello.fromNode,
          })
        },
        onClosed: () => {
          if (this.replies === replies) this.replies = undefined
        },
      },
    }
  }

  private receive(from: NodeId, op: ReceivedOp): void {
    if (op.checksumOk)
      this.payloads.set(`${op.epoch}:${op.seq}`, { data: op.data, noHole: op.noHole })
    this.events.push({
      type: 'receive',
      epoch: op.epoch,
      seq: op.seq,
      from,
      kind: op.kind,
      offset: op.offset,
      length: op.length,
      fua: op.fua,
      checksumOk: op.checksumOk,
    })
  }

  private perform(effects: SecondaryEffect[]): void {
    for (const effect of effects) this.performOne(effect)
  }

  private performOne(effect: SecondaryEffect): void {
    switch (effect.type) {
      case 'writeLocal':
        this.applyLocal(effect)
        return
      case 'flushLocal':
        this.options.local.flush().then(
          () => {
            this.events.push({
              type: 'localFlushDone',
              epoch: effect.epoch,
              flushId: effect.flushId,
              ok: true,
            })
          },
          (error: unknown) => {
            this.options.log.error('local flush failed', { error: errorMessage(error) })
            this.events.push({
              type: 'localFlushDone',
              epoch: effect.epoch,
              flushId: effect.flushId,
              ok: false,
            })
          },
        )
        return
      case 'ack':
        // A re-ack of an already applied duplicate has no writeLocal to consume its payload.
        this.payloads.delete(`${effect.epoch}:${effect.seq}`)
        this.replies?.ack(effect.epoch, effect.seq)
        return
      case 'flushAck':
        this.replies?.flushAck(effect.epoch, effect.flushId)
        return
      case 'reject':
        this.payloads.delete(`${effect.epoch}:${effect.seq}`)
        this.options.log.warn('rejected a replicated op', { seq: effect.seq, code: effect.code })
        this.replies?.reject(effect.epoch, effect.seq, effect.code, `rejected: ${effect.code}`)
        return
      case 'rejectFlush':
        this.replies?.rejectFlush(
          effect.epoch,
          effect.flushId,
          effect.code,
          `rejected: ${effect.code}`,
        )
        return
      default:
        unreachable(effect)
    }
  }

  private applyLocal(effect: Extract<SecondaryEffect, { type: 'writeLocal' }>): void {
    const key = `${effect.epoch}:${effect.seq}`
    const payload = this.payloads.get(key)
    this.payloads.delete(key)
    const local = this.options.local
    let done: Promise<void>
    switch (effect.kind) {
      case 'write':
        assert(
          payload !== undefined && payload.data.length === effect.length,
          'write without its payload',
        )
        done = local.write(effect.offset, payload.data, effect.fua)
        break
      case 'trim':
        done = local.trim(effect.offset, effect.length, effect.fua)
        break
      case 'zero':
        done = local.zero(effect.offset, effect.length, {
          fua: effect.fua,
          noHole: payload?.noHole ?? false,
          fastZero: false,
        })
        break
      default:
        unreachable(effect.kind)
    }
    done.then(
      () => {
        this.events.push({ type: 'localDone', epoch: effect.epoch, seq: effect.seq, ok: true })
      },
      (error: unknown) => {
        this.options.log.error('local write failed', { error: errorMessage(error) })
        this.events.push({ type: 'localDone', epoch: effect.epoch, seq: effect.seq, ok: false })
      },
    )
  }
}
