/**
 * Assertions that stay on in production. A failed assertion is a programmer error: the process
 * must crash rather than go on with state it no longer understands (TigerBeetle's rule).
 * Operational failures (bad input, a lost peer) are never asserted; they are typed errors.
 */

export class AssertionError extends Error {
  override name = 'AssertionError'
}

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError(message)
}

/** An integer in [0, 2^53): offsets and lengths inside duplex after the codec edge. */
export function assertSafeUint(value: number, what: string): void {
  assert(Number.isSafeInteger(value) && value >= 0, `${what} must be a safe unsigned integer`)
}

/** Marks a switch as exhaustive: the compiler rejects a missing case, the runtime crashes. */
export function unreachable(value: never): never {
  throw new AssertionError(`unreachable: ${JSON.stringify(value)}`)
}
