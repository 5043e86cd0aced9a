/**
 * Running a daemon in the foreground: until SIGTERM or SIGINT (a second signal exits at once),
 * or until the supervisor that started it with an IPC channel (`duplex demo`) goes away. SIGHUP
 * reloads the daemon's certificates. Shared by `duplex node` and `duplex witness`.
 */
import type { Logger } from '../core/log.js'

/**
 * Resolves with the exit code once `stop` finished (0) or failed (1). SIGHUP calls `reload`
 * (re-read certificates) and does not stop the daemon.
 */
export function runUntilStopped(
  stopDaemon: () => Promise<void>,
  log: Logger,
  reload?: () => void,
): Promise<number> {
  return new Promise((resolve) => {
    let stopping = false
    const finish = (code: number): void => {
      // An IPC channel from a supervisor keeps the event loop alive: let go of it.
      if (process.connected) process.disconnect()
      resolve(code)
      // The daemon is stopped. A socket a frozen peer never closes (an HTTP/2 session to a
      // SIGSTOPped client survives gRPC's forced shutdown) must not keep the process alive.
      setTimeout(() => process.exit(code), 1000).unref()
    }
    const stop = (why: string): void => {
      stopping = true
      log.info('stopping', { why })
      stopDaemon().then(
        () => {
          finish(0)
        },
        (error: unknown) => {
          log.error('unclean stop', { error: String(error) })
          finish(1)
        },
      )
    }
    const onSignal = (signal: NodeJS.Signals): void => {
      if (!stopping) {
        stop(signal)
        return
      }
      log.warn('second signal: exiting without waiting for in-flight requests', { signal })
      process.exit(1)
    }
    process.on('SIGHUP', () => {
      log.info('SIGHUP: reloading certificates')
      reload?.()
    })
    process.on('SIGTERM', onSignal)
    process.on('SIGINT', onSignal)
    // Started by a supervisor with an IPC channel (duplex demo): stop when it goes away.
    process.on('disconnect', () => {
      if (!stopping) stop('supervisor gone')
    })
  })
}
