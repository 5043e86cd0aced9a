/**
 * Epoch numbers: `generation * termsPerGeneration + term`, one JavaScript safe integer.
 *
 * A **generation** changes the owner's authority: only the witness issues one (a grant: Degrade,
 * Takeover, Handover), or an admin's forced promotion. A **term** is a fence the current owner
 * takes by itself within its generation, without the witness: a primary that restarts, or whose
 * peer restarted, continues in `epoch + 1` so that the old stream's messages are refused. Both
 * replicas record an epoch before they use it, and comparing epochs as numbers orders them by
 * generation first.
 *
 * Why two parts: ARCHITECTURE.md says only the witness issues epochs, and also that losing the
 * witness while both sites run changes nothing; a restart during a witness outage needs a new
 * fence anyway. Terms give that fence, and a term can never reach the next generation, so a node
 * acting alone can never produce an epoch the witness will issue to someone else.
 */
import { assert } from './assert.js'

/** Terms in one generation: an owner would need a million restarts to run out. */
export const termsPerGeneration = 1_000_000

export function generationOf(epoch: number): number {
  return Math.floor(epoch / termsPerGeneration)
}

export function termOf(epoch: number): number {
  return epoch % termsPerGeneration
}

/** The owner's next fence within its generation. */
export function nextTerm(epoch: number): number {
  assert(termOf(epoch) < termsPerGeneration - 1, `epoch ${epoch} has no term left`)
  return epoch + 1
}

/** The first epoch of the generation after `epoch`'s (term 0). */
export function nextGeneration(epoch: number): number {
  const next = (generationOf(epoch) + 1) * termsPerGeneration
  assert(Number.isSafeInteger(next), `epoch ${epoch} has no generation left`)
  return next
}

/** For people: "3.2" is generation 3, term 2. */
export function formatEpoch(epoch: number): string {
  return `${generationOf(epoch)}.${termOf(epoch)}`
}
