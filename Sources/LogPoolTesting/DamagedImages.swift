import LogPool
import LogPoolFormat

/// Pool images with one deliberate kind of damage, shared by the engine's and the CLI's
/// tests of what open, verify and every command must say about them.
public enum DamagedImages {
    /// An 8 MiB pool (64 KiB segments, no compression) with volume "v" and two synced
    /// batches after a checkpoint; in `damaged`, one bit of the first batch's first
    /// record is flipped. A later record proves that record was synced, so this is
    /// damage inside synced space (FORMAT J-7), never a torn tail.
    public static func syncedJournalDamage() throws -> (intact: [UInt8], damaged: [UInt8]) {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, segmentSize: 64 << 10, compression: .none)
        let v = try pool.createVolume(name: "v", size: 1 << 20)
        try pool.checkpoint()
        try v.write(at: 0, from: CrashWorkloads.pattern(8192, seed: 1))
        try pool.sync()
        try v.write(at: 65536, from: CrashWorkloads.pattern(8192, seed: 2))
        try pool.sync()
        let intact = device.durable
        guard let slot = WriteChecks.newestSlot(intact) else {
            throw PoolError.corrupt(structure: "superblock", byteOffset: 0, detail: "the test image has no valid slot")
        }
        var damaged = intact
        let firstRecord = Int(PoolGeometry.journalByteOffset + slot.journalReplayByteOffset)
        damaged[firstRecord + JournalRecordLayout.headerByteCount + 3] ^= 0x04
        return (intact, damaged)
    }
}
