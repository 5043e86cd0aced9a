/** The part of fs-native-extensions (CommonJS, no type declarations) that src/replica uses. */
declare module 'fs-native-extensions' {
  interface FsNativeExtensions {
    /** Exclusive OFD lock on the whole file; false if another open file description holds it. */
    tryLock(fd: number): boolean
    /** Punches a hole (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); the range reads as zeros. */
    trim(fd: number, offset: number, length: number): Promise<void>
  }
  const fsx: FsNativeExtensions
  export default fsx
}
