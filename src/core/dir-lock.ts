/**
 * One process per data directory: an OFD lock on `DIR/lock`, held while the returned handle is
 * open (closing it, or the process dying, releases the lock). Used by the node's store and the
 * witness's.
 */
import { open } from 'node:fs/promises'
import type { FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import fsx from 'fs-native-extensions'
import { DuplexError } from './errors.js'

/** Locks `dir` (which must exist); STORE_LOCKED if another process holds it. */
export async function lockDirectory(dir: string, daemon: string): Promise<FileHandle> {
  const handle = await open(join(dir, 'lock'), 'a')
  if (!fsx.tryLock(handle.fd)) {
    await handle.close()
    throw new DuplexError(
      'STORE_LOCKED',
      `data directory ${dir} is in use by another process (is a ${daemon} already running?)`,
    )
  }
  return handle
}
