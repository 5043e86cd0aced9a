/**
 * The source's side of a replica move (move.ts has the rules): `MoveSource` copies this node's
 * replica of a volume to the node the catalog moves it to, pass after pass, while the replica
 * keeps serving; then it asks the primary to cut over, and the primary calls back `finish` with
 * client I/O paused. Any failure starts the copy over after a pause (MoveBegin empties the
 * target); the old pair keeps serving meanwhile, so a failed attempt costs time, never data.
 *
 * If this replica is the primary, the peer is promoted first (a handover): the cutover pauses
 * the primary, which must not be the replica that leaves.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import { DuplexError, errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { DirtyRange } from '../replica/dirty-map.js'
import { peerLeaseDefaults } from '../replica/failover.js'
import { MoveCopy, moveCopyDefaults } from '../replica/move.js'
import type { MoveCopyOptions } from '../replica/move.js'
import type {
  MoveAdoptReply,
  MoveFinishRequest,
  PeerControlClient,
} from '../replica/peer-control.js'
import { moveWriteBytesMax } from '../replica/peer-control.js'
import type { ReplicaController } from '../replica/replica-controller.js'
import type { Volume } from '../replica/volume.js'

/** Pause before a failed attempt starts over. */
const retryMs = 2000
/** Pieces in flight to the target. */
const piecesInFlight = 4
const pieceBytes = Math.min(1024 * 1024, moveWriteBytesMax)
/** Extents one allocation query returns. */
const extentsPerQuery = 1024
/** The primary's whole cutover: the pause, the last copy, the witness. */
const cutoverDeadlineMs = 180_000

export interface MoveSourceOptions {
  nodeName: string
  toNode: string
  local: Volume
  controller: ReplicaController
  /** The target's Peer service. */
  target: PeerControlClient
  /** The Peer service of the node this replica pairs with now. */
  peerControl: () => PeerControlClient
  /** Bytes per second the copy may use (0: unlimited); the volume's resync rate. */
  rateBytes: number
  log: Logger
  copy?: MoveCopyOptions
}

export type MoveSourceState = 'copying' | 'cutting over' | 'done' | 'retrying'

export class MoveSource {
  private stopped = false
  private running: Promise<void> | undefined
  /** The copy that waits for the primary's `finish` call. */
  private finishing: MoveCopy | undefined
  private current: MoveCopy | undefined
  private leavingTimer: NodeJS.Timeout | undefined
  state: MoveSourceState = 'copying'
  /** Bytes sent to the target, every pass and attempt. */
  bytesSent = 0
  lastError: string | undefined

  constructor(private readonly options: MoveSourceOptions) {}

  get volume(): string {
    return this.options.local.name
  }

  get toNode(): string {
    return this.options.toNode
  }

  /** Progress of the current attempt: the bytes of the volume not dirty any more. */
  progress(): { done: number; total: number } {
    const total = this.options.local.info.sizeBytes
    const copy = this.current
    if (this.state === 'done') return { done: total, total }
    return { done: copy === undefined ? 0 : total - copy.remainingBytes, total }
  }

  start(): void {
    this.running ??= this.loop()
  }

  async stop(): Promise<void> {
    this.stopped = true
    clearTimeout(this.leavingTimer)
    await this.running
  }

  /**
   * The primary paused client I/O and drained it: copy what is left (nothing can change any
   * more), then the target takes this replica's record. Reads of this node's clients go to the
   * primary from here on.
   */
  async finish(request: MoveFinishRequest): Promise<MoveAdoptReply> {
    const copy = this.finishing
    const { controller, target, nodeName, local } = this.options
    if (copy === undefined || request.toNode !== this.options.toNode) {
      throw new DuplexError(
        'FAILED_PRECONDITION',
        `${nodeName} has no copy of ${this.volume} to ${request.toNode} waiting for its cutover`,
      )
    }
    controller.checkMoveSource(request.fromNode, request.epoch)
    clearTimeout(this.leavingTimer)
    controller.setLeaving(true)
    try {
      await this.copyPass(copy, true)
      if (copy.remainingBytes > 0) {
        throw new DuplexError(
          'FAILED_PRECONDITION',
          `${this.volume} changed on ${nodeName} during the final copy: client I/O is not paused`,
        )
      }
      await local.flush()
      const record = controller.replicaRecord
      return await target.moveAdopt({
        volume: this.volume,
        fromNode: nodeName,
        epoch: record.epoch,
        primary: record.primary,
        state: record.state,
        history: record.history ?? [],
      })
    } catch (error) {
      this.stayLeavingAWhile()
      throw error
    }
  }

  /** A method, not the field: `stop` sets it while an attempt is awaited. */
  private isStopped(): boolean {
    return this.stopped
  }

  private async loop(): Promise<void> {
    const { log } = this.options
    while (!this.stopped) {
      try {
        await this.attempt()
        this.state = 'done'
        return
      } catch (error) {
        if (this.isStopped()) return
        this.state = 'retrying'
        this.lastError = errorMessage(error)
        log.warn('replica move interrupted; it starts over', {
          volume: this.volume,
          to: this.options.toNode,
          error: this.lastError,
        })
        await sleep(retryMs)
      }
    }
  }

  private async attempt(): Promise<void> {
    const { local, target, nodeName, controller, log } = this.options
    const copy = new MoveCopy(local.info.sizeBytes, this.options.copy ?? moveCopyDefaults)
    this.current = copy
    this.state = 'copying'
    const unobserve = local.observeChanges((offset, length) => {
      copy.changed(offset, length)
    })
    try {
      await target.moveBegin({ volume: this.volume, fromNode: nodeName, sizeBytes: copy.sizeBytes })
      log.info('copying the replica to its new node', { volume: this.volume, to: this.toNode })
      while (!this.stopped) {
        if (!copy.readyForCutover()) {
          await this.copyPass(copy, false)
          continue
        }
        const status = controller.status()
        if (status.role === 'primary') {
          // The primary pauses for the cutover and stays in the pair: hand the role over first.
          await this.options.peerControl().promote({ volume: this.volume })
          continue
        }
        if (status.role !== 'secondary' || status.state !== 'UpToDate') {
          throw new DuplexError(
            'UNAVAILABLE',
            `the replica is ${status.role} and ${status.state}; the cutover waits for a synced pair`,
          )
        }
        this.state = 'cutting over'
        this.finishing = copy
        await this.options.peerControl().moveCutover(
          {
            volume: this.volume,
            fromNode: nodeName,
            toNode: this.toNode,
            epoch: controller.replicaRecord.epoch,
          },
          cutoverDeadlineMs,
        )
        log.info('replica moved', { volume: this.volume, to: this.toNode, sent: this.bytesSent })
        return
      }
      throw new DuplexError('SHUTTING_DOWN', 'the move stopped')
    } finally {
      this.finishing = undefined
      unobserve()
    }
  }

  /**
   * After a failed final step this replica may or may not still be in the pair (the primary's
   * answer was lost): no local reads for one peer lease. If the primary moved on, the lease it
   * no longer renews has run out by then; if not, it renews it and reads are local again.
   */
  private stayLeavingAWhile(): void {
    clearTimeout(this.leavingTimer)
    const { leaseMs, marginMs } = peerLeaseDefaults
    this.leavingTimer = setTimeout(
      () => {
        this.options.controller.setLeaving(false)
      },
      leaseMs + 2 * marginMs,
    )
    this.leavingTimer.unref()
  }

  /** Copies the dirty ranges (the first pass skips holes: the target starts empty). */
  private async copyPass(copy: MoveCopy, final: boolean): Promise<void> {
    const firstPass = copy.passes === 0
    const ranges = copy.takePass()
    // The workers share one generator: an async generator queues concurrent `next` calls.
    const pieces = this.piecesOf(ranges, firstPass)
    const started = performance.now()
    let sent = 0
    const workers = Array.from({ length: piecesInFlight }, async () => {
      for (;;) {
        if (this.stopped) throw new DuplexError('SHUTTING_DOWN', 'the move stopped')
        const next = await pieces.next()
        if (next.done === true) return
        sent += await this.send(next.value)
        const rate = final ? 0 : this.options.rateBytes
        if (rate > 0) {
          const ahead = (sent / rate) * 1000 - (performance.now() - started)
          if (ahead > 0) await sleep(ahead)
        }
      }
    })
    try {
      await Promise.all(workers)
    } catch (error) {
      copy.failed(ranges) // the attempt starts over anyway; keep the count honest meanwhile
      throw error
    }
  }

  /** The pieces of `ranges`, as data or holes per the local allocation map. */
  private async *piecesOf(
    ranges: readonly DirtyRange[],
    skipHoles: boolean,
  ): AsyncGenerator<{ offset: number; length: number; hole: boolean }> {
    const { local } = this.options
    for (const range of ranges) {
      let at = range.offset
      const end = range.offset + range.length
      while (at < end) {
        const extents = await local.allocation(at, end - at, extentsPerQuery)
        if (extents.length === 0) break
        for (const extent of extents) {
          const length = Math.min(extent.lengthBytes, end - at)
          if (extent.hole) {
            if (!skipHoles) yield { offset: at, length, hole: true }
          } else {
            for (let piece = 0; piece < length; piece += pieceBytes) {
              yield {
                offset: at + piece,
                length: Math.min(pieceBytes, length - piece),
                hole: false,
              }
            }
          }
          at += length
          if (at >= end) break
        }
      }
    }
  }

  private async send(piece: { offset: number; length: number; hole: boolean }): Promise<number> {
    const { local, target, nodeName } = this.options
    const data = piece.hole ? Buffer.alloc(0) : await local.read(piece.offset, piece.length)
    await target.moveWrite({
      volume: this.volume,
      fromNode: nodeName,
      offset: piece.offset,
      length: piece.length,
      data,
      hole: piece.hole,
    })
    this.bytesSent += data.length
    return data.length
  }
}
