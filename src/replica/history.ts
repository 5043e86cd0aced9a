/**
 * Generation histories (store.ts `ReplicaRecord.history`), pure: each replica lists the
 * generations it entered and who owned each. Generations are issued one at a time by the witness,
 * so two replicas can only disagree about a generation's owner after an admin forced a promotion
 * while the other side was running alone: their data has forked (split brain), and no automatic
 * resync may pick a winner.
 */
import { generationOf } from '../core/epochs.js'
import { generationHistoryMax } from './store.js'
import type { GenerationEntry, ReplicaRecord } from './store.js'

/** `history` with `entry` appended (once per generation), the oldest dropped past the bound. */
export function appendGeneration(
  history: readonly GenerationEntry[],
  entry: GenerationEntry,
): GenerationEntry[] {
  if (history.some((known) => known.generation === entry.generation)) return [...history]
  const next = [...history, entry].sort((a, b) => a.generation - b.generation)
  return next.slice(Math.max(0, next.length - generationHistoryMax))
}

export interface Fork {
  generation: number
  mine: GenerationEntry
  theirs: GenerationEntry
}

/** The first generation both histories list with different owners, if any. */
export function findFork(
  mine: readonly GenerationEntry[],
  theirs: readonly GenerationEntry[],
): Fork | undefined {
  for (const entry of mine) {
    const other = theirs.find((candidate) => candidate.generation === entry.generation)
    if (other !== undefined && other.owner !== entry.owner) {
      return { generation: entry.generation, mine: entry, theirs: other }
    }
  }
  return undefined
}

export function describeFork(fork: Fork): string {
  const side = (entry: GenerationEntry): string =>
    `${entry.owner}${entry.forced ? ' (forced by an admin)' : ''}`
  return (
    `split brain: generation ${fork.generation} is owned by ${side(fork.mine)} here and by ` +
    `${side(fork.theirs)} on the peer; both may have acknowledged writes the other lacks. ` +
    `Pick the replica to keep: duplex volume resolve VOLUME --keep NODE`
  )
}

/**
 * `next` as a replica persists it after `current`: entering a newer generation appends it (with
 * its owner, and whether an admin forced it) to the history the record carries on.
 */
export function recordWithHistory(
  current: ReplicaRecord,
  next: ReplicaRecord,
  forced = false,
): ReplicaRecord {
  let history = next.history ?? current.history ?? []
  if (next.epoch > 0 && generationOf(next.epoch) > generationOf(current.epoch)) {
    history = appendGeneration(history, {
      generation: generationOf(next.epoch),
      owner: next.primary,
      forced,
    })
  }
  return history.length === 0 ? { ...next } : { ...next, history }
}
