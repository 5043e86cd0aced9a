/**
 * Who may call what on a gRPC server running cluster TLS (src/core/tls.ts). Each service builds
 * its rules (an `Authorize` per method, see unary-rpc.ts) from these checks; a refusal is a
 * PERMISSION_DENIED reply that names the caller and the reason. On a plaintext server no rule
 * runs: such a cluster trusts its network (docs/security.md).
 */
import { DuplexError } from './errors.js'
import { describeIdentity, roleUnit } from './tls.js'
import type { Identity, Role } from './tls.js'
import type { Caller } from './unary-rpc.js'

export function denied(caller: Caller, action: string, reason: string): DuplexError {
  return new DuplexError(
    'PERMISSION_DENIED',
    `${describeIdentity(caller.identity)} at ${caller.address} may not ${action}: ${reason}`,
  )
}

/** The caller's identity, if its certificate carries one of `allowed` roles. */
export function requireRole(caller: Caller, allowed: readonly Role[], action: string): Identity {
  const identity = caller.identity
  if (identity?.role === undefined || !allowed.includes(identity.role)) {
    const needs = allowed.map(roleUnit).join(' or ')
    throw denied(caller, action, `it needs a ${needs} certificate`)
  }
  return identity
}

/** The caller is the node `name` (a duplex-node certificate with that common name). */
export function requireNode(caller: Caller, name: string, action: string): void {
  const identity = requireRole(caller, ['node'], action)
  if (identity.name !== name) {
    throw denied(
      caller,
      action,
      `the request speaks for ${name}, the certificate for ${identity.name}`,
    )
  }
}
