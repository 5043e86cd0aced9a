/**
 * Fault injection for real-process tests, switched on by environment variables that a
 * production deployment never sets (each one logs a loud warning at start):
 *
 * - `DUPLEX_FAULT_CORRUPT_REPLICATION=every:N` flips one byte of every Nth replicated write
 *   payload after its xxh64 was computed (the secondary must refuse it; the re-send is clean);
 *   `=all` corrupts every payload, re-sends included (nothing may ever be applied or acked).
 */
import { DuplexError } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { PeerLinkClientOptions } from '../replica/peer-link.js'

export const corruptReplicationVariable = 'DUPLEX_FAULT_CORRUPT_REPLICATION'

/** Link options carrying the faults the environment asks for (empty when it asks for none). */
export function faultsFromEnvironment(
  env: NodeJS.ProcessEnv,
  log: Logger,
): Pick<PeerLinkClientOptions, 'mutateOutgoing'> {
  const spec = env[corruptReplicationVariable]
  if (spec === undefined || spec === '') return {}
  const every = spec === 'all' ? 1 : Number(/^every:(\d+)$/.exec(spec)?.[1])
  if (!Number.isSafeInteger(every) || every < 1) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${corruptReplicationVariable}=${spec}: use 'all' or 'every:N' with N >= 1`,
    )
  }
  log.warn('FAULT INJECTION: corrupting replicated write payloads', { spec })
  let writes = 0
  return {
    mutateOutgoing: (op, data) => {
      if (op.kind !== 'write' || data.length === 0) return data
      writes += 1
      if (spec !== 'all' && writes % every !== 0) return data
      const corrupt = Buffer.from(data)
      corrupt[0] = (corrupt[0] ?? 0) ^ 0xff
      return corrupt
    },
  }
}
