/**
 * When one replica of a volume fails over, as a pure state machine: no I/O, no clock (every call
 * takes `now` from the node's monotonic clock). The replica controller runs it on a timer and
 * performs what it decides; the deterministic simulation (test/sim/failover.test.ts) drives the
 * same rules on simulated clocks. ARCHITECTURE.md "Leases" and "Failures".
 *
 * - Peer leases: both replicas of a pair renew each other's lease every `renewIntervalMs`. The
 *   holder counts from its send (lease.ts); the grantor remembers its last grant and, once the
 *   replica is leaving the pair (`detaching`), grants no more.
 * - A paired primary whose stream to the peer has been down `peerLossMs` detaches, waits until
 *   the lease it granted has surely expired (the peer then serves nothing), then asks the
 *   witness to run alone (`degrade`).
 * - A secondary whose lease from the primary lapsed detaches too; UpToDate, it asks the witness
 *   to take over once the lease it granted has surely expired; otherwise it cannot serve.
 * - A degraded primary serves only while its witness lease is valid (a forced one regardless),
 *   and probes its peer to bring it back (`reattach`).
 * - Attempts are spaced `retryMs` apart; a refusal that may pass ("not yet") is asked again
 *   after one tick, and loses quorum only after `patienceMs` of refusals.
 */
import { generationOf, nextGeneration, nextTerm } from '../core/epochs.js'
import type { VolumeRecord } from '../witness/arbiter.js'
import { grantorLeaseEnd, holderLeaseEnd } from '../witness/lease.js'
import type { LeaseTiming } from '../witness/lease.js'
import { mergeRanges } from './dirty-map.js'
import type { DirtyRange } from './dirty-map.js'
import type { ReplicaRecord } from './store.js'

type ReplicaState = ReplicaRecord['state']

export interface FailoverTiming {
  /** How often the controller calls `tick`. */
  tickMs: number
  /** Peer leases are renewed this often. */
  renewIntervalMs: number
  /** A primary whose peer stream has been down this long starts to fail over. */
  peerLossMs: number
  /** After a role starts, failover waits this long for the peer to show up first. */
  roleStartGraceMs: number
  /** Between two failover attempts (a degrade, a takeover, a probe of a returning peer). */
  retryMs: number
  /** Refusals that may pass (witness unreachable or pausing) lose quorum after this long. */
  patienceMs: number
  peerLease: LeaseTiming
}

export const peerLeaseDefaults: LeaseTiming = { leaseMs: 2000, driftRatio: 0.01, marginMs: 250 }

export const failoverTimingDefaults: FailoverTiming = {
  tickMs: 200,
  renewIntervalMs: 500,
  peerLossMs: 1000,
  roleStartGraceMs: 4000,
  retryMs: 1000,
  patienceMs: 6000,
  peerLease: peerLeaseDefaults,
}

export type FailoverRole =
  | { type: 'primary'; degraded: boolean; forced: boolean; connected: boolean }
  | { type: 'secondary'; expectedPrimary: string; state: ReplicaState }
  | { type: 'none' }

export interface FailoverView {
  now: number
  role: FailoverRole
  /** The node has a witness (without one, only a forced primary acts alone). */
  witness: boolean
  /** This node's lease from the witness is valid now. */
  witnessLeaseValid: boolean
  /** A failover or role change is under way: decide nothing new. */
  busy: boolean
  /** judgeWitnessRecord on the witness's record as this node last heard it. */
  witnessVerdict?: WitnessVerdict['type']
}

export type FailoverAction = 'degrade' | 'takeover' | 'reattach' | 'yield' | 'adopt'

export type QuorumChange = { type: 'regain' } | { type: 'lose'; why: string }

export interface FailoverStep {
  /** Send a peer lease renewal now (answer with `renewAnswered`). */
  renew: boolean
  /** Start this attempt now (report a refusal with `refused`). */
  action: FailoverAction | undefined
  quorum: QuorumChange | undefined
}

export class Failover {
  /** Holder: this replica's lease from its peer ends then (local clock). */
  private peerLeaseEnd = 0
  /** Grantor: when this replica last renewed its peer's lease. */
  private peerGrantedAt = -Infinity
  private renewing = false
  private lastRenewAt = -Infinity
  private roleStartedAt = 0
  private disconnectedSince: number | undefined
  /** Set while this replica is leaving its peer: it renews the peer's lease no more. */
  private detaching = false
  private lastAttemptAt = -Infinity
  /** When the current failover attempts began (undefined: none under way). */
  private attemptsSince: number | undefined

  constructor(readonly timing: FailoverTiming = failoverTimingDefaults) {}

  /** A new role (or epoch) starts: leases of the old one count no more. */
  roleStarted(now: number): void {
    this.roleStartedAt = now
    this.disconnectedSince = undefined
    this.detaching = false
    this.peerLeaseEnd = 0
    this.peerGrantedAt = -Infinity
    this.attemptsSince = undefined
  }

  /** This replica's lease from its peer is valid at `now`. */
  peerLeaseValid(now: number): boolean {
    return this.peerLeaseEnd > now
  }

  /** Grantor: the peer asks to renew; `counterpart` says it is this replica's pair in this epoch. */
  grantRenewal(counterpart: boolean, now: number): boolean {
    const granted = counterpart && !this.detaching
    if (granted) this.peerGrantedAt = now
    return granted
  }

  /**
   * Leaves the pair at an admin's word (a forced promotion): grants the peer's lease no more and
   * returns when the lease granted last has surely expired (the peer serves nothing after it).
   */
  detach(): number {
    this.detaching = true
    return grantorLeaseEnd(this.peerGrantedAt, this.timing.peerLease)
  }

  /** Holder: the renewal sent at `sentAt` was answered (`granted` in the same epoch). */
  renewAnswered(sentAt: number, granted: boolean): void {
    this.renewing = false
    if (granted) {
      this.peerLeaseEnd = Math.max(this.peerLeaseEnd, holderLeaseEnd(sentAt, this.timing.peerLease))
    }
  }

  /** Every `tickMs`: what to do now. */
  tick(view: FailoverView): FailoverStep {
    const { now, role } = view
    const step: FailoverStep = { renew: false, action: undefined, quorum: undefined }
    const paired = (role.type === 'primary' && !role.degraded) || role.type === 'secondary'
    if (paired && !this.renewing && now - this.lastRenewAt >= this.timing.renewIntervalMs) {
      this.renewing = true
      this.lastRenewAt = now
      step.renew = true
    }
    if (view.busy || now - this.roleStartedAt < this.timing.roleStartGraceMs) return step
    if (role.type === 'primary' && (view.witnessVerdict ?? 'current') !== 'current') {
      step.action = this.attempt(now, view.witnessVerdict === 'yield' ? 'yield' : 'adopt')
      return step
    }
    if (role.type === 'primary' && role.degraded) {
      step.quorum =
        role.forced || view.witnessLeaseValid
          ? { type: 'regain' }
          : { type: 'lose', why: 'this node lost its witness lease while running alone' }
      step.action = this.attempt(now, 'reattach')
      return step
    }
    if (!view.witness) return step
    if (role.type === 'primary') {
      if (role.connected) {
        this.disconnectedSince = undefined
        this.detaching = false
        if (this.peerLeaseEnd > now) step.quorum = { type: 'regain' }
        return step
      }
      this.disconnectedSince ??= now
      if (now - this.disconnectedSince < this.timing.peerLossMs) return step
      // The peer is gone: renew its lease no more, and once it has surely expired (the peer
      // then serves nothing), ask the witness to run alone.
      this.detaching = true
      if (now < grantorLeaseEnd(this.peerGrantedAt, this.timing.peerLease)) return step
      step.action = this.attempt(now, 'degrade')
      return step
    }
    if (role.type === 'secondary') {
      if (this.peerLeaseEnd > now) {
        this.detaching = false
        step.quorum = { type: 'regain' }
        return step
      }
      this.detaching = true
      if (role.state !== 'UpToDate') {
        step.quorum = {
          type: 'lose',
          why: `the primary ${role.expectedPrimary} is unreachable and this replica is ${role.state}`,
        }
        return step
      }
      if (now < grantorLeaseEnd(this.peerGrantedAt, this.timing.peerLease)) return step
      step.action = this.attempt(now, 'takeover')
    }
    return step
  }

  /**
   * An attempt was refused; `final` unless it may pass. Returns true when quorum is lost now
   * (final, or refused for `patienceMs`).
   */
  refused(now: number, final: boolean): boolean {
    this.attemptsSince ??= now
    // "Not yet" (the old owner's lease is about to lapse): ask again after one tick.
    if (!final) this.lastAttemptAt = now - this.timing.retryMs + this.timing.tickMs
    return final || now - this.attemptsSince >= this.timing.patienceMs
  }

  /** Service is possible again: a later refusal starts a new patience period. */
  regained(): void {
    this.attemptsSince = undefined
  }

  private attempt(now: number, action: FailoverAction): FailoverAction | undefined {
    if (now - this.lastAttemptAt < this.timing.retryMs) return undefined
    this.lastAttemptAt = now
    return action
  }
}

/**
 * At start, with a witness: what it recorded while this node was away wins over the local
 * record. A takeover by the peer makes this replica its secondary, Outdated unless the volume
 * stayed in sync in this replica's generation. undefined: keep the local record.
 */
export function adoptWitnessRecord(
  local: ReplicaRecord,
  witness: VolumeRecord | undefined,
  me: string,
): ReplicaRecord | undefined {
  if (witness === undefined || witness.epoch <= local.epoch) return undefined
  // This node's own forced lineage stays; the witness adopts it once this node reports.
  if (judgeWitnessRecord(local, witness, me).type === 'adopt' && witness.owner !== me) {
    return undefined
  }
  const adopted: ReplicaRecord =
    witness.owner === me
      ? { epoch: witness.epoch, primary: me, state: local.state }
      : {
          epoch: witness.epoch,
          primary: witness.owner,
          state: local.state === 'UpToDate' && !witness.inSync ? 'Outdated' : local.state,
        }
  if (local.epoch === 0 && adopted.state === 'UpToDate') adopted.state = 'Inconsistent'
  return adopted
}

/**
 * A secondary learns a newer epoch from its primary's Hello. A newer generation was issued by
 * the witness (a degrade or a takeover: the primary ran alone) or forced by an admin, and this
 * replica may lack what was written meanwhile: it is Outdated until a resync completes. (A
 * handover's generation reaches its new secondary through the handover itself, not a Hello.)
 * A newer term of the same generation only fenced a restart: nothing was written alone.
 */
export function learnedRecord(local: ReplicaRecord, epoch: number, primary: string): ReplicaRecord {
  const ranAlone = generationOf(epoch) > generationOf(local.epoch)
  const state = ranAlone && local.state === 'UpToDate' ? 'Outdated' : local.state
  return { ...local, epoch, primary, state }
}

export interface ResyncInput {
  sizeBytes: number
  peer: { state: ReplicaState; hot: readonly DirtyRange[]; bootId: string }
  /** This node restarted since the peer was last in sync (its activity log counts). */
  hotSyncPending: boolean
  /** The peer's boot id when it was last in sync (undefined: never in this role). */
  peerBootIdInSync: string | undefined
  /** What this node wrote alone (dirty bitmap). */
  dirty: readonly DirtyRange[]
  /** This node's persisted activity log. */
  ownHot: readonly DirtyRange[]
}

export type ResyncPlan =
  | { type: 'inSync' }
  | {
      type: 'sync'
      kind: 'full' | 'hot extents' | 'dirty regions and hot extents'
      ranges: DirtyRange[]
    }

/**
 * A primary whose stream to the peer is (re)open: what to copy to bring the peer up to date. An
 * Inconsistent peer gets everything (initial sync). Otherwise where the replicas may differ: the
 * dirty bitmap (written alone), the peer's activity log (from when it was primary), and this
 * node's activity log after its own restart (writes in flight at a crash) or a reboot of the
 * peer's machine (acknowledged but unflushed writes are gone). Otherwise every write issued here
 * was acknowledged by both, or was pending at a failover and then it is in the dirty bitmap.
 */
export function resyncPlan(input: ResyncInput): ResyncPlan {
  const { peer } = input
  const peerRebooted =
    input.peerBootIdInSync === undefined || peer.bootId !== input.peerBootIdInSync
  const behind =
    peer.state !== 'UpToDate' ||
    input.hotSyncPending ||
    input.dirty.length > 0 ||
    peer.hot.length > 0 ||
    (input.peerBootIdInSync !== undefined && peerRebooted)
  if (!behind) return { type: 'inSync' }
  if (peer.state === 'Inconsistent') {
    return { type: 'sync', kind: 'full', ranges: [{ offset: 0, length: input.sizeBytes }] }
  }
  const ownHot = input.hotSyncPending || peerRebooted ? input.ownHot : []
  return {
    type: 'sync',
    kind: input.dirty.length > 0 ? 'dirty regions and hot extents' : 'hot extents',
    ranges: mergeRanges([...input.dirty, ...ownHot, ...peer.hot]),
  }
}

/**
 * What a primary makes of the witness's record of its volume (compared with its own record):
 * - `current`: nothing newer there.
 * - `adopt`: continue in `epoch`. Either the witness granted this node a generation whose answer
 *   was lost (it would otherwise keep the volume recorded as run alone and refuse the peer a
 *   takeover), or this node's generation was forced by an admin while the witness issued the
 *   same generation number to the other side (the split brain the admin accepted): this lineage
 *   continues in a generation above both, which the witness adopts.
 * - `yield`: another node owns a newer generation (it took over); follow it whatever the leases
 *   say. (Its history may fork from this one after a forced promotion: the resync then refuses
 *   and reports the split brain.)
 */
export type WitnessVerdict =
  | { type: 'current' }
  /** `forced`: the generation continues a forced lineage the witness has not adopted yet. */
  | { type: 'adopt'; epoch: number; forced: boolean }
  | { type: 'yield'; owner: string }

export function judgeWitnessRecord(
  local: ReplicaRecord,
  witness: VolumeRecord | undefined,
  me: string,
): WitnessVerdict {
  if (witness === undefined) return { type: 'current' }
  if (witness.owner !== me && generationOf(witness.epoch) === generationOf(local.epoch)) {
    const mine = local.history?.find((entry) => entry.generation === generationOf(local.epoch))
    if (mine?.forced === true && mine.owner === me) {
      return {
        type: 'adopt',
        epoch: nextGeneration(Math.max(local.epoch, witness.epoch)),
        forced: true,
      }
    }
  }
  if (witness.epoch <= local.epoch) return { type: 'current' }
  if (witness.owner === me) {
    return { type: 'adopt', epoch: Math.max(witness.epoch, nextTerm(local.epoch)), forced: false }
  }
  return { type: 'yield', owner: witness.owner }
}
