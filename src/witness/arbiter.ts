/**
 * The witness's arbitration, as a pure state machine: node leases, and per volume the epoch, its
 * owner (the replica that orders writes) and whether both replicas are in sync. No I/O, no clock:
 * every method takes `now` from the witness's monotonic clock.
 *
 * Decisions do not change the durable state: `degrade`, `takeover`, `handover` and `report`
 * return the volume record they would write (`change`), and the caller makes it durable, then
 * `apply`s it, then answers. The caller must run one decision at a time (decide, persist, apply)
 * or two requests could both be granted against the same state.
 *
 * The rules (ARCHITECTURE.md "Failures"; epochs.ts for generations and terms):
 * - `degrade`: the owner lost its peer and asks to acknowledge writes alone. Granted to the owner
 *   of the current generation: a new generation, sole owner (`inSync: false`).
 * - `takeover`: the other replica asks to become the sole owner. Granted only if the volume was in
 *   sync in the requester's generation (so its replica holds every acknowledged write) and the
 *   owner's node lease has surely expired (lease.ts); otherwise the owner is alive and wins.
 *   Refusals that may turn into a grant later (a lease not expired yet, the restart pause) are
 *   UNAVAILABLE; the others FAILED_PRECONDITION.
 * - `handover`: the owner, in sync and drained, hands the role to its peer in a new generation.
 * - `report`: a node says what it runs. The owner of the current generation may advance the term
 *   and say whether its peer is in sync (after a resync); a higher generation than the witness
 *   knows is adopted (the witness lost its disk, or an admin forced a promotion); anything else
 *   changes nothing and the node learns the witness's record from the reply.
 * - `replace`: a replica moved (`duplex volume move`, `node drain`). The owner, in sync, paused,
 *   with the moving replica copied byte for byte to its new node, records the new pair. Same
 *   epoch, still in sync: the new replica holds exactly what the old one did, and the old one
 *   can no longer ask for anything (it is not a replica any more).
 * - Retried grants are idempotent: a sole owner asking again gets its record back.
 * - After a restart (construction) the arbiter grants nothing until every lease a node may hold
 *   from before has expired: one lease period plus margins.
 */
import type { ErrorCode } from '../core/errors.js'
import { formatEpoch, generationOf, nextGeneration } from '../core/epochs.js'
import { grantorLeaseEnd } from './lease.js'
import type { LeaseTiming } from './lease.js'

/** What the witness keeps durable for one volume. */
export interface VolumeRecord {
  volume: string
  /** The two nodes holding a replica (sorted). */
  replicas: readonly [string, string]
  /** The newest epoch the witness issued or learned. */
  epoch: number
  /** The replica that orders writes in `epoch`. */
  owner: string
  /** Both replicas hold every acknowledged write; false: only the owner does (degraded). */
  inSync: boolean
}

export type Decision =
  | { ok: true; record: VolumeRecord; change: VolumeRecord | undefined }
  | { ok: false; code: ErrorCode; message: string }

export interface GrantRequest {
  volume: string
  node: string
  /** The newest epoch the requester knows. */
  epoch: number
}

export interface HandoverGrantRequest {
  volume: string
  fromNode: string
  toNode: string
  epoch: number
}

export interface ReplaceRequest {
  volume: string
  /** The owner, which asks. */
  node: string
  epoch: number
  /** The replica that moved away, and the node that holds it now. */
  fromNode: string
  toNode: string
}

export interface ReportRequest {
  volume: string
  node: string
  replicas: readonly [string, string]
  epoch: number
  primary: string
  /** The reporter is the primary and its peer is UpToDate in `epoch`. */
  inSync: boolean
}

export interface NodeLeaseView {
  node: string
  /** Witness clock time the lease was last renewed. */
  renewedAt: number
  /** Milliseconds until the witness considers the node gone (0: gone). */
  remainingMs: number
}

/** Nodes the witness tracks leases for; heartbeats from more are refused. */
export const leaseNodesMax = 4096

export class Arbiter {
  private readonly records = new Map<string, VolumeRecord>()
  private readonly renewed = new Map<string, number>()
  /** No grant before this (a restart forgets which leases it granted). */
  readonly quietUntil: number

  constructor(
    readonly timing: LeaseTiming,
    records: Iterable<VolumeRecord>,
    startedAt: number,
  ) {
    for (const record of records) this.records.set(record.volume, record)
    this.quietUntil = grantorLeaseEnd(startedAt, timing)
  }

  // ---- volatile: leases

  /** A node renewed its lease. False: too many nodes (the request is refused). */
  heartbeat(node: string, now: number): boolean {
    if (!this.renewed.has(node) && this.renewed.size >= leaseNodesMax) return false
    this.renewed.set(node, now)
    return true
  }

  /** Whether the witness must still assume `node` may act on its lease. */
  leaseMayBeValid(node: string, now: number): boolean {
    if (now < this.quietUntil) return true
    const renewedAt = this.renewed.get(node)
    return renewedAt !== undefined && now < grantorLeaseEnd(renewedAt, this.timing)
  }

  leases(now: number): NodeLeaseView[] {
    return [...this.renewed].map(([node, renewedAt]) => ({
      node,
      renewedAt,
      remainingMs: Math.max(0, grantorLeaseEnd(renewedAt, this.timing) - now),
    }))
  }

  // ---- durable: volumes

  record(volume: string): VolumeRecord | undefined {
    return this.records.get(volume)
  }

  allRecords(): VolumeRecord[] {
    return [...this.records.values()]
  }

  /** The records of volumes with a replica on `node`. */
  recordsOf(node: string): VolumeRecord[] {
    return this.allRecords().filter((record) => record.replicas.includes(node))
  }

  /** Drop the record of a deleted volume (after the caller made that durable). */
  forget(volume: string): void {
    this.records.delete(volume)
  }

  /** Make a decided change current (after the caller made it durable). */
  apply(change: VolumeRecord): void {
    this.records.set(change.volume, change)
  }

  degrade(request: GrantRequest, now: number): Decision {
    const known = this.known(request.volume, now)
    if (!known.ok) return known
    const { record } = known
    const { node, epoch } = request
    const ahead = aheadOfWitness(request, record)
    if (ahead !== undefined) return ahead
    // A retry (the answer was lost): the record is newer than the requester knows. Otherwise
    // even an owner recorded as not in sync (its peer still syncing) gets a new generation, so
    // that a report of its older epoch still in flight cannot mark the volume in sync again.
    if (record.owner === node && !record.inSync && record.epoch > epoch) return unchanged(record)
    if (record.owner !== node) {
      return refuse(
        'FAILED_PRECONDITION',
        `${node} may not run ${request.volume} alone: ${record.owner} owns it in epoch ${formatEpoch(record.epoch)}`,
      )
    }
    if (generationOf(epoch) !== generationOf(record.epoch)) {
      return stale(request, record)
    }
    return granted({ ...record, epoch: next(epoch, record), owner: node, inSync: false })
  }

  takeover(request: GrantRequest, now: number): Decision {
    const known = this.known(request.volume, now)
    if (!known.ok) return known
    const { record } = known
    const { node, epoch, volume } = request
    if (!record.replicas.includes(node)) return notAReplica(node, record)
    const ahead = aheadOfWitness(request, record)
    if (ahead !== undefined) return ahead
    if (record.owner === node) {
      if (!record.inSync) return unchanged(record)
      return refuse(
        'FAILED_PRECONDITION',
        `${node} is the primary of ${volume} already; a primary that lost its peer asks to degrade`,
      )
    }
    if (!record.inSync) {
      return refuse(
        'FAILED_PRECONDITION',
        `${node}'s replica of ${volume} may lack writes: ${record.owner} has run it alone since ` +
          `epoch ${formatEpoch(record.epoch)}`,
      )
    }
    if (generationOf(epoch) < generationOf(record.epoch)) return stale(request, record)
    if (this.leaseMayBeValid(record.owner, now)) {
      // Not yet: the owner may be alive. UNAVAILABLE: asking again later may succeed.
      return refuse(
        'UNAVAILABLE',
        `${record.owner} still holds its lease (it may be alive) and keeps ${volume}`,
      )
    }
    return granted({ ...record, epoch: next(epoch, record), owner: node, inSync: false })
  }

  handover(request: HandoverGrantRequest, now: number): Decision {
    const known = this.known(request.volume, now)
    if (!known.ok) return known
    const { record } = known
    const { fromNode, toNode, epoch, volume } = request
    if (!record.replicas.includes(toNode)) return notAReplica(toNode, record)
    if (fromNode === toNode) {
      return refuse('INVALID_ARGUMENT', `${fromNode} cannot hand ${volume} over to itself`)
    }
    const done = record.owner === toNode && record.inSync
    if (done && generationOf(epoch) < generationOf(record.epoch)) return unchanged(record)
    if (record.owner !== fromNode) {
      return refuse(
        'FAILED_PRECONDITION',
        `${fromNode} cannot hand ${volume} over: ${record.owner} owns it in epoch ${formatEpoch(record.epoch)}`,
      )
    }
    if (!record.inSync) {
      return refuse(
        'FAILED_PRECONDITION',
        `${toNode}'s replica of ${volume} is not in sync; wait for the resync`,
      )
    }
    if (generationOf(epoch) !== generationOf(record.epoch)) {
      return stale({ volume, node: fromNode, epoch }, record)
    }
    return granted({ ...record, epoch: next(epoch, record), owner: toNode, inSync: true })
  }

  replace(request: ReplaceRequest, now: number): Decision {
    const known = this.known(request.volume, now)
    if (!known.ok) return known
    const { record } = known
    const { volume, node, epoch, fromNode, toNode } = request
    const pair = sortedPair([node, toNode])
    if (pair === undefined || fromNode === toNode || fromNode === node) {
      return refuse(
        'INVALID_ARGUMENT',
        `${node} cannot replace ${fromNode} by ${toNode} in ${volume}: three different nodes are needed`,
      )
    }
    const done = record.replicas[0] === pair[0] && record.replicas[1] === pair[1]
    if (done && record.owner === node && record.epoch === epoch) return unchanged(record)
    if (!record.replicas.includes(fromNode)) return notAReplica(fromNode, record)
    if (record.owner !== node || record.epoch !== epoch) {
      return refuse(
        'FAILED_PRECONDITION',
        `${node} cannot move ${volume}'s replica in epoch ${formatEpoch(epoch)}: ` +
          `${record.owner} owns it in epoch ${formatEpoch(record.epoch)}`,
      )
    }
    if (!record.inSync) {
      return refuse(
        'FAILED_PRECONDITION',
        `${volume} is not in sync (${node} runs it alone); a replica moves only from a synced pair`,
      )
    }
    return granted({ ...record, replicas: pair })
  }

  report(request: ReportRequest): Decision {
    const { volume, node, replicas, epoch, primary } = request
    const sorted = sortedPair(replicas)
    if (sorted === undefined || !sorted.includes(node) || !sorted.includes(primary)) {
      return refuse(
        'INVALID_ARGUMENT',
        `report for ${volume}: replicas ${replicas.join(', ')} must be two different nodes ` +
          `including the reporter ${node} and the primary ${primary}`,
      )
    }
    const record = this.records.get(volume)
    const reported: VolumeRecord = {
      volume,
      replicas: sorted,
      epoch,
      owner: primary,
      inSync: request.inSync,
    }
    if (record === undefined) return granted(reported)
    if (record.replicas[0] !== sorted[0] || record.replicas[1] !== sorted[1]) {
      return refuse(
        'INVALID_ARGUMENT',
        `${volume} has replicas on ${record.replicas.join(' and ')} at the witness, ` +
          `not ${sorted.join(' and ')}`,
      )
    }
    if (generationOf(epoch) > generationOf(record.epoch)) return granted(reported)
    const owns = node === record.owner && primary === node
    if (!owns || generationOf(epoch) !== generationOf(record.epoch) || epoch < record.epoch) {
      return unchanged(record)
    }
    if (epoch === record.epoch && request.inSync === record.inSync) return unchanged(record)
    return granted({ ...record, epoch, inSync: request.inSync })
  }

  private known(
    volume: string,
    now: number,
  ): { ok: true; record: VolumeRecord } | { ok: false; code: ErrorCode; message: string } {
    if (now < this.quietUntil) {
      const waitMs = Math.ceil(this.quietUntil - now)
      return refuse(
        'UNAVAILABLE',
        `the witness restarted and grants nothing for another ${waitMs} ms (leases from before may still be held)`,
      )
    }
    const record = this.records.get(volume)
    if (record === undefined) {
      return refuse(
        'VOLUME_NOT_FOUND',
        `the witness does not know ${volume}; its nodes report it first`,
      )
    }
    return { ok: true, record }
  }
}

function next(epoch: number, record: VolumeRecord): number {
  return nextGeneration(Math.max(epoch, record.epoch))
}

function sortedPair(replicas: readonly [string, string]): readonly [string, string] | undefined {
  const [a, b] = replicas
  if (a === b) return undefined
  return a < b ? [a, b] : [b, a]
}

function refuse(code: ErrorCode, message: string): { ok: false; code: ErrorCode; message: string } {
  return { ok: false, code, message }
}

function unchanged(record: VolumeRecord): Decision {
  return { ok: true, record, change: undefined }
}

function granted(change: VolumeRecord): Decision {
  return { ok: true, record: change, change }
}

function stale(request: GrantRequest, record: VolumeRecord): Decision {
  return refuse(
    'FAILED_PRECONDITION',
    `${request.node} asked about ${request.volume} in epoch ${formatEpoch(request.epoch)}, ` +
      `but the witness is at ${formatEpoch(record.epoch)} (owner ${record.owner}); the node must catch up`,
  )
}

function notAReplica(node: string, record: VolumeRecord): Decision {
  return refuse(
    'INVALID_ARGUMENT',
    `${node} holds no replica of ${record.volume} (${record.replicas.join(' and ')} do)`,
  )
}

/**
 * A request from a generation newer than the witness knows (an admin forced a promotion while
 * the witness was away, or the witness lost its disk): the witness cannot judge it until the
 * primary of that generation reports it.
 */
function aheadOfWitness(request: GrantRequest, record: VolumeRecord): Decision | undefined {
  if (generationOf(request.epoch) <= generationOf(record.epoch)) return undefined
  return refuse(
    'FAILED_PRECONDITION',
    `${request.node} knows ${request.volume} in epoch ${formatEpoch(request.epoch)}, newer than ` +
      `the witness's ${formatEpoch(record.epoch)}; its primary must report that epoch first`,
  )
}
