/**
 * This machine's boot id (Linux: /proc/sys/kernel/random/boot_id): it changes at every boot, so
 * a peer that reports the same boot id as before kept its page cache (the process may have
 * restarted, the machine did not). Elsewhere, a random id per process: every restart then counts
 * as a reboot, which is the safe side.
 */
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'

function readBootId(): string {
  try {
    const id = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()
    if (/^[0-9a-f-]{36}$/.test(id)) return id
  } catch {
    // not Linux, or /proc is not mounted
  }
  return `process-${randomUUID()}`
}

export const bootId = readBootId()
