/**
 * Which role a node's replica takes when it starts: a pure decision from what this node persisted
 * and what its peer says (or that the peer cannot be reached). No I/O, no clock.
 *
 * Each replica persists `{epoch, primary, state}` (store.ts `ReplicaRecord`), synced before it
 * acts on it. Epochs only grow, and every epoch has one primary, recorded by both replicas before
 * they use it: a primary start takes epoch + 1, a handover hands epoch + 1 to the other node. So
 * when the two records differ, the one with the higher epoch is the newer truth (a node that
 * crashed in the middle of a handover learns the outcome from its peer).
 *
 * Rules, in order:
 * - Peer unreachable: a replica that never joined (epoch 0) waits, because only the peer can say
 *   whether the volume already holds data (a replaced node must not start empty as primary).
 *   Otherwise the local record decides: primary in a new epoch if it names this node and the
 *   replica is UpToDate, secondary of the node it names otherwise. (Without the peer a primary
 *   acknowledges nothing, so acting on a stale record cannot lose or fork data.)
 * - Both replicas new (epoch 0): the configured primary starts epoch 1 as UpToDate (a new volume
 *   reads as zeroes everywhere, or it holds the data of a volume created before replication was
 *   configured); the other waits for it as an Inconsistent secondary and is filled by the
 *   initial sync.
 * - A replica at epoch 0 whose peer has joined (epoch > 0) is Inconsistent, whatever it says.
 * - A replica whose peer ran alone (`dirty`) in a newer epoch is Outdated: it missed writes.
 * - The newer record names this node: primary in a new epoch if this replica is UpToDate. If it is
 *   not (this node lost its disk and was rebuilt empty), the peer must take over: ask it to.
 * - The newer record names the peer: secondary of the peer in that epoch.
 */
import type { ReplicaRecord } from './store.js'

/** What the peer said about its replica (Describe), as far as roles are concerned. */
export interface PeerView {
  exists: boolean
  epoch: number
  primary: string
  state: 'UpToDate' | 'Inconsistent' | 'Outdated'
  /** The peer ran the volume alone (degraded): a replica behind it missed writes. */
  dirty?: boolean
}

export interface RoleInput {
  me: string
  peer: string
  /** The primary named in the cluster configuration; used only for a brand-new volume. */
  configuredPrimary: string
  local: ReplicaRecord
  /** undefined: the peer could not be reached. */
  remote: PeerView | undefined
}

export type RoleDecision =
  | { type: 'primary'; record: ReplicaRecord }
  /** `expectedPrimary`: the node whose Hello to accept (the record's, or the configured one). */
  | { type: 'secondary'; record: ReplicaRecord; expectedPrimary: string }
  | { type: 'askPeerToTakeOver'; reason: string }
  | { type: 'wait'; reason: string }

export function decideRole(input: RoleInput): RoleDecision {
  const { me, peer, local, remote } = input
  if (remote === undefined) {
    if (local.epoch === 0) {
      return {
        type: 'wait',
        reason: `peer ${peer} is unreachable, and only it can say whether the volume holds data`,
      }
    }
    return fromRecord(input, local)
  }
  const remoteRecord: ReplicaRecord = remote.exists
    ? { epoch: remote.epoch, primary: remote.primary, state: remote.state }
    : { epoch: 0, primary: '', state: 'Inconsistent' }
  if (local.epoch === 0 && remoteRecord.epoch === 0) {
    if (input.configuredPrimary === me) {
      return { type: 'primary', record: { epoch: 1, primary: me, state: 'UpToDate' } }
    }
    return {
      type: 'secondary',
      record: { epoch: 0, primary: '', state: 'Inconsistent' },
      expectedPrimary: input.configuredPrimary,
    }
  }
  const remoteNewer = remoteRecord.epoch > local.epoch
  const truth = remoteNewer ? remoteRecord : local
  // A replica that never joined a pair holds nothing the pair wrote: whatever its own record
  // says (a volume created here by hand), it must be filled from a peer that has joined. One
  // whose peer ran alone (degraded) in a newer epoch missed those writes: it is Outdated.
  const state =
    local.epoch === 0 && remoteRecord.epoch > 0
      ? 'Inconsistent'
      : remoteNewer && remote.dirty === true && local.state === 'UpToDate'
        ? 'Outdated'
        : local.state
  if (truth.primary === me && state !== 'UpToDate') {
    if (remoteRecord.state === 'UpToDate') {
      return {
        type: 'askPeerToTakeOver',
        reason: `this replica is Inconsistent but named primary in epoch ${truth.epoch}; ${peer} holds the data`,
      }
    }
    return {
      type: 'wait',
      reason: `neither replica is UpToDate (epoch ${truth.epoch}); an admin must decide which to keep`,
    }
  }
  return fromRecord(input, { ...truth, state })
}

function fromRecord(input: RoleInput, record: ReplicaRecord): RoleDecision {
  if (record.primary === input.me && record.state === 'UpToDate') {
    return { type: 'primary', record: { ...record, epoch: record.epoch + 1 } }
  }
  if (record.primary === input.me) {
    return {
      type: 'wait',
      reason: `this replica is named primary in epoch ${record.epoch} but is not UpToDate`,
    }
  }
  if (record.primary !== input.peer) {
    return {
      type: 'wait',
      reason: `the replica record names ${record.primary}, which is neither this node nor its peer`,
    }
  }
  return { type: 'secondary', record, expectedPrimary: record.primary }
}
