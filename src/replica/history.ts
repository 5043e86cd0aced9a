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
  /** The last generation both went through with the same owner (0: none known). */
  common: number
  /** The first generation each entered after it. */
  mine: GenerationEntry
  theirs: GenerationEntry
}

/**
 * Whether the two histories fork: one generation has two owners, or after the last generation
 * they share (same number, same owner) each went on into one the other did not enter, owned by
 * different nodes. That happens only when a forced promotion ran beside the witness's lineage:
 * the same generation number given to two owners, or different numbers on each side.
 *
 * Gaps alone are no fork: a replica far behind has nothing after the common generation, and a
 * sync target learns its source's generation without entering the ones it slept through, so it
 * may list 3 where its source lists 2 and 3 (or, in a description sent before the source
 * entered 3, only 2). Generations are issued in order and the owner of each lists it, so in one
 * lineage the first generations after a gap have the same owner; two owners there are two
 * lineages. Entries older than the other side's oldest (histories are bounded) are not compared.
 */
export function findFork(
  mine: readonly GenerationEntry[],
  theirs: readonly GenerationEntry[],
): Fork | undefined {
  const [myOldest] = mine
  const [theirOldest] = theirs
  if (myOldest === undefined || theirOldest === undefined) return undefined
  const owners = new Map(theirs.map((entry) => [entry.generation, entry.owner]))
  // One generation with two owners, wherever it lies (a replica that followed the other side
  // afterwards still lists it).
  for (const entry of mine) {
    const other = theirs.find((candidate) => candidate.generation === entry.generation)
    if (other !== undefined && other.owner !== entry.owner) {
      const before = mine.filter((each) => each.generation < entry.generation)
      const shared = before.filter((each) => owners.get(each.generation) === each.owner)
      return { common: shared.at(-1)?.generation ?? 0, mine: entry, theirs: other }
    }
  }
  let common = 0
  for (const entry of mine) {
    if (owners.get(entry.generation) === entry.owner) common = Math.max(common, entry.generation)
  }
  const floor = Math.max(common, Math.max(myOldest.generation, theirOldest.generation) - 1)
  const myNext = mine.find((entry) => entry.generation > floor)
  const theirNext = theirs.find((entry) => entry.generation > floor)
  if (myNext === undefined || theirNext === undefined) return undefined
  if (myNext.owner === theirNext.owner) return undefined
  return { common, mine: myNext, theirs: theirNext }
}

export function describeFork(fork: Fork): string {
  const side = (entry: GenerationEntry): string =>
    `${entry.owner}${entry.forced ? ' (forced by an admin)' : ''}`
  const where =
    fork.mine.generation === fork.theirs.generation
      ? `generation ${fork.mine.generation} is owned by ${side(fork.mine)} here and by ` +
        `${side(fork.theirs)} on the peer`
      : `after generation ${fork.common}, this replica went on in generation ` +
        `${fork.mine.generation} (${side(fork.mine)}) and the peer in generation ` +
        `${fork.theirs.generation} (${side(fork.theirs)})`
  return (
    `split brain: ${where}; both may have acknowledged writes the other lacks. ` +
    `Pick the replica to keep: duplex volume resolve VOLUME --keep NODE`
  )
}

/**
 * `next` as a replica persists it after `current`. A generation enters the history (with its
 * owner, and whether an admin forced it) once the replica holds its data: when it is UpToDate
 * in it. A replica that only learned of a generation (Outdated: the owner wrote without it, or
 * Inconsistent) lists it after its resync, not before: otherwise a forced promotion from that
 * Outdated replica would look like a descendant of the generation whose writes it lacks, and
 * the fork with the owner's replica would go unnoticed (a resync would silently drop the
 * owner's writes).
 */
export function recordWithHistory(
  current: ReplicaRecord,
  next: ReplicaRecord,
  forced = false,
): ReplicaRecord {
  let history = next.history ?? current.history ?? []
  const generation = generationOf(next.epoch)
  const newest = history.at(-1)?.generation ?? -1
  if (next.epoch > 0 && next.state === 'UpToDate' && generation > newest) {
    history = appendGeneration(history, {
      generation: generationOf(next.epoch),
      owner: next.primary,
      forced,
    })
  }
  return history.length === 0 ? { ...next } : { ...next, history }
}
