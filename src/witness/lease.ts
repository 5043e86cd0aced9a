/**
 * Lease arithmetic, pure. Clocks are never compared across machines: each side measures a lease
 * with its own monotonic clock, and the two rules below keep the holder's view of a lease ending
 * no later, in real time, than the grantor's, whatever the delays and drifts.
 *
 * Every clock may run up to `driftRatio` fast or slow against real time. The holder times its
 * lease from when it SENT the renewal (earlier than any receipt) and counts `leaseMs * (1 - d)`
 * on its clock: at most `leaseMs` of real time. The grantor times it from when it RECEIVED the
 * renewal and counts `leaseMs * (1 + d) + marginMs` on its clock: at least `leaseMs` of real time,
 * plus a margin. So when the grantor considers a lease expired, the holder has stopped relying on
 * it.
 *
 * Used for node leases (node holds, witness grants) and peer leases (a replica holds, its peer
 * grants by answering).
 */
export interface LeaseTiming {
  /** Nominal lease length. */
  leaseMs: number
  /** Bound on any clock's rate error against real time, e.g. 0.01 for 1%. */
  driftRatio: number
  /** Extra wait on the grantor's side, for scheduling delays in the check itself. */
  marginMs: number
}

/** ARCHITECTURE.md: a node lease of ~3 s, renewed every ~0.5 s. */
export const nodeLeaseDefaults: LeaseTiming = { leaseMs: 3000, driftRatio: 0.01, marginMs: 250 }
export const heartbeatIntervalMsDefault = 500

/** Holder: its lease, renewed by a request sent at `sentAt` (its clock), holds until this time. */
export function holderLeaseEnd(sentAt: number, timing: LeaseTiming): number {
  return sentAt + timing.leaseMs * (1 - timing.driftRatio)
}

/** Grantor: a lease renewed by a request received at `receivedAt` (its clock) may be in use until. */
export function grantorLeaseEnd(receivedAt: number, timing: LeaseTiming): number {
  return receivedAt + timing.leaseMs * (1 + timing.driftRatio) + timing.marginMs
}

/** Problems with a timing from a config file or a peer; undefined when sound. */
export function leaseTimingProblem(timing: LeaseTiming): string | undefined {
  const { leaseMs, driftRatio, marginMs } = timing
  if (!Number.isFinite(leaseMs) || leaseMs < 100 || leaseMs > 600_000) {
    return `lease ${leaseMs} ms is outside 100 ms .. 10 min`
  }
  if (!Number.isFinite(driftRatio) || driftRatio < 0 || driftRatio >= 0.5) {
    return `drift ratio ${driftRatio} is outside 0 .. 0.5`
  }
  if (!Number.isFinite(marginMs) || marginMs < 0 || marginMs > leaseMs) {
    return `margin ${marginMs} ms is outside 0 .. the lease`
  }
  return undefined
}
