/**
 * The replica's failover rules (src/replica/failover.ts), rule by rule. Their behaviour under
 * faults, with the write path and the witness, is checked by test/sim/failover.test.ts.
 */
import t from 'tap'
import { termsPerGeneration } from '../../src/core/epochs.js'
import {
  adoptWitnessRecord,
  Failover,
  failoverTimingDefaults,
  judgeWitnessRecord,
  learnedRecord,
  resyncPlan,
} from '../../src/replica/failover.js'
import type { FailoverRole, FailoverView } from '../../src/replica/failover.js'
import type { ReplicaRecord } from '../../src/replica/store.js'
import type { VolumeRecord } from '../../src/witness/arbiter.js'
import { grantorLeaseEnd } from '../../src/witness/lease.js'

const G = termsPerGeneration
const timing = failoverTimingDefaults
const grace = timing.roleStartGraceMs

function view(now: number, role: FailoverRole, extra: Partial<FailoverView> = {}): FailoverView {
  return { now, role, witness: true, witnessLeaseValid: true, busy: false, ...extra }
}

const paired: FailoverRole = { type: 'primary', degraded: false, forced: false, connected: true }
const cutOff: FailoverRole = { type: 'primary', degraded: false, forced: false, connected: false }
const secondary: FailoverRole = { type: 'secondary', expectedPrimary: 'a', state: 'UpToDate' }

t.test('peer leases: renewed on schedule, counted from the send', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  const first = failover.tick(view(0, paired))
  t.equal(first.renew, true, 'renews at once')
  t.equal(failover.tick(view(100, paired)).renew, false, 'one renewal in flight at a time')
  failover.renewAnswered(0, true)
  t.equal(failover.peerLeaseValid(1900), true, 'valid within the lease, counted from the send')
  t.equal(failover.peerLeaseValid(2000), false, 'and not past it')
  t.equal(failover.tick(view(400, paired)).renew, false, 'not before the interval')
  t.equal(failover.tick(view(500, paired)).renew, true, 'again after the interval')
  failover.renewAnswered(500, false)
  t.equal(failover.peerLeaseValid(2100), false, 'a refusal extends nothing')
})

t.test('a primary cut off from its peer degrades only after the lease it granted', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  t.equal(failover.grantRenewal(true, grace), true, 'grants its paired peer')
  t.equal(failover.grantRenewal(false, grace), false, 'never another epoch or node')
  const cut = grace + 100
  t.equal(failover.tick(view(cut, cutOff)).action, undefined, 'not at once')
  const detached = cut + timing.peerLossMs
  t.equal(failover.tick(view(detached, cutOff)).action, undefined, 'lease granted still runs')
  t.equal(failover.grantRenewal(true, detached), false, 'grants nothing once detaching')
  const expiry = grantorLeaseEnd(grace, timing.peerLease)
  t.equal(failover.tick(view(expiry - 1, cutOff)).action, undefined, 'not before it surely ended')
  t.equal(failover.tick(view(expiry, cutOff)).action, 'degrade', 'then asks to run alone')
  t.equal(failover.tick(view(expiry + 200, cutOff)).action, undefined, 'attempts are spaced')
  t.equal(failover.tick(view(expiry + timing.retryMs, cutOff)).action, 'degrade')
})

t.test('nothing happens during the grace period after a role starts', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  t.equal(failover.tick(view(grace - 1, cutOff)).action, undefined)
  t.equal(failover.tick(view(grace - 1, secondary)).action, undefined)
  t.equal(failover.tick(view(grace + 5000, cutOff, { busy: true })).action, undefined, 'nor busy')
})

t.test('a secondary takes over only UpToDate and after the lease it granted', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  failover.grantRenewal(true, grace)
  const expiry = grantorLeaseEnd(grace, timing.peerLease)
  t.equal(failover.tick(view(expiry - 1, secondary)).action, undefined)
  t.equal(failover.tick(view(expiry, secondary)).action, 'takeover')
  const outdated = new Failover()
  outdated.roleStarted(0)
  const step = outdated.tick(
    view(grace, { type: 'secondary', expectedPrimary: 'a', state: 'Outdated' }),
  )
  t.equal(step.action, undefined, 'an Outdated replica never asks')
  t.match(step.quorum, { type: 'lose', why: /a is unreachable and this replica is Outdated/ })
})

t.test('refusals: "not yet" is asked again next tick, quorum lost after patience', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  t.equal(failover.tick(view(grace, secondary)).action, 'takeover')
  t.equal(failover.refused(grace + 10, false), false, 'not lost yet')
  t.equal(
    failover.tick(view(grace + 10 + timing.tickMs, secondary)).action,
    'takeover',
    'one tick later',
  )
  const end = grace + 10 + timing.patienceMs
  t.equal(failover.refused(end - 1, false), false, 'not before patience runs out')
  t.equal(failover.refused(end, false), true, 'lost after patience')
  failover.regained()
  t.equal(failover.refused(end + 1, false), false, 'a new period')
  t.equal(failover.refused(end + 2, true), true, 'final: lost at once')
})

t.test('a degraded primary serves by its witness lease and probes its peer', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  const alone: FailoverRole = { type: 'primary', degraded: true, forced: false, connected: false }
  const step = failover.tick(view(grace, alone))
  t.same(step.quorum, { type: 'regain' })
  t.equal(step.action, 'reattach')
  t.equal(step.renew, false, 'no peer lease alone')
  t.match(failover.tick(view(grace + 1000, alone, { witnessLeaseValid: false })).quorum, {
    type: 'lose',
  })
  const forced: FailoverRole = { type: 'primary', degraded: true, forced: true, connected: false }
  t.same(
    failover.tick(view(grace + 2000, forced, { witnessLeaseValid: false })).quorum,
    { type: 'regain' },
    'a forced primary serves without the witness',
  )
})

t.test('the witness record comes first: yield to a newer owner, adopt a lost grant', async (t) => {
  const failover = new Failover()
  failover.roleStarted(0)
  t.equal(failover.tick(view(grace, paired, { witnessVerdict: 'yield' })).action, 'yield')
  t.equal(failover.tick(view(grace + 5000, paired, { witnessVerdict: 'adopt' })).action, 'adopt')
})

const record = (epoch: number, state: ReplicaRecord['state'] = 'UpToDate'): ReplicaRecord => ({
  epoch,
  primary: 'a',
  state,
})

t.test('learnedRecord: a newer generation makes an UpToDate secondary Outdated', async (t) => {
  t.same(learnedRecord(record(G + 2), G + 3, 'a'), record(G + 3), 'a term: nothing written alone')
  t.same(learnedRecord(record(G + 2), 2 * G, 'a'), record(2 * G, 'Outdated'))
  t.same(learnedRecord(record(G + 2, 'Inconsistent'), 2 * G, 'a'), record(2 * G, 'Inconsistent'))
})

const witnessRecord = (epoch: number, owner: string, inSync = false): VolumeRecord => ({
  volume: 'v',
  replicas: ['a', 'b'],
  epoch,
  owner,
  inSync,
})

t.test('adoptWitnessRecord: what the witness recorded while this node was away', async (t) => {
  t.equal(adoptWitnessRecord(record(2 * G), witnessRecord(G + 4, 'b'), 'a'), undefined, 'older')
  t.same(
    adoptWitnessRecord(record(G + 2), witnessRecord(2 * G, 'b'), 'a'),
    { epoch: 2 * G, primary: 'b', state: 'Outdated' },
    'the peer took over: Outdated',
  )
  t.same(
    adoptWitnessRecord(record(G + 2), witnessRecord(2 * G, 'b', true), 'a'),
    { epoch: 2 * G, primary: 'b', state: 'UpToDate' },
    'handed over in sync',
  )
  t.same(adoptWitnessRecord(record(G + 2), witnessRecord(2 * G, 'a'), 'a'), {
    epoch: 2 * G,
    primary: 'a',
    state: 'UpToDate',
  })
  const forced: ReplicaRecord = {
    ...record(2 * G),
    history: [{ generation: 2, owner: 'a', forced: true }],
  }
  t.equal(
    adoptWitnessRecord(forced, witnessRecord(2 * G + 1, 'b'), 'a'),
    undefined,
    'a forced lineage is not given up for the other side of the split',
  )
})

t.test('judgeWitnessRecord', async (t) => {
  t.same(judgeWitnessRecord(record(G + 2), undefined, 'a'), { type: 'current' })
  t.same(judgeWitnessRecord(record(G + 2), witnessRecord(G + 2, 'a'), 'a'), { type: 'current' })
  t.same(judgeWitnessRecord(record(G + 2), witnessRecord(2 * G, 'b'), 'a'), {
    type: 'yield',
    owner: 'b',
  })
  t.same(
    judgeWitnessRecord(record(G + 2), witnessRecord(2 * G, 'a'), 'a'),
    { type: 'adopt', epoch: 2 * G, forced: false },
    'a grant whose answer was lost',
  )
  const forced: ReplicaRecord = {
    ...record(2 * G + 1),
    history: [{ generation: 2, owner: 'a', forced: true }],
  }
  t.same(
    judgeWitnessRecord(forced, witnessRecord(2 * G + 3, 'b'), 'a'),
    { type: 'adopt', epoch: 3 * G, forced: true },
    'the same generation issued to the other side: move above both',
  )
  t.same(judgeWitnessRecord(forced, witnessRecord(G + 3, 'b'), 'a'), { type: 'current' })
  t.same(
    judgeWitnessRecord(forced, witnessRecord(3 * G, 'b'), 'a'),
    { type: 'yield', owner: 'b' },
    'a newer generation of the other side (a takeover after the witness adopted this lineage)',
  )
})

t.test('resyncPlan', async (t) => {
  const base = {
    sizeBytes: 1 << 20,
    peer: { state: 'UpToDate' as const, hot: [], bootId: 'x' },
    hotSyncPending: false,
    peerBootIdInSync: 'x',
    dirty: [],
    ownHot: [{ offset: 0, length: 4096 }],
  }
  t.same(resyncPlan(base), { type: 'inSync' }, 'nothing differs')
  t.same(resyncPlan({ ...base, peer: { ...base.peer, state: 'Inconsistent' } }), {
    type: 'sync',
    kind: 'full',
    ranges: [{ offset: 0, length: 1 << 20 }],
  })
  t.same(
    resyncPlan({ ...base, dirty: [{ offset: 8192, length: 4096 }] }),
    {
      type: 'sync',
      kind: 'dirty regions and hot extents',
      ranges: [{ offset: 8192, length: 4096 }],
    },
    'own activity log skipped: every write issued here was acknowledged by both',
  )
  t.same(
    resyncPlan({ ...base, peer: { ...base.peer, bootId: 'y' } }),
    { type: 'sync', kind: 'hot extents', ranges: [{ offset: 0, length: 4096 }] },
    'the peer machine rebooted: its unflushed writes are gone, own activity log copied',
  )
  t.same(
    resyncPlan({ ...base, hotSyncPending: true }),
    { type: 'sync', kind: 'hot extents', ranges: [{ offset: 0, length: 4096 }] },
    'after this node restarted',
  )
})
