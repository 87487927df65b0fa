import LogPool

/// A device that reads as `base` (shared, never copied) overlaid with 512-byte sector
/// patches, and takes its writes into the overlay. The crash simulator recovers every
/// crash state on one, so building and checking a state costs what the state changes,
/// not the size of the image (CRASH-MODEL §3: copy-on-write over the durable image). Syncs only
/// count: these devices are thrown away after the check.
public final class OverlayDevice: BlockDevice {
    public static let sectorByteCount = 512
    private let base: [UInt8]
    private var sectors: [Int: [UInt8]] = [:]
    /// 512-byte sectors whose reads fail with EIO (media damage, class C7).
    public var unreadableSectors: Set<Int> = []
    public private(set) var writeCount = 0
    public private(set) var syncCount = 0

    /// `base` with `patches` (byte offset, bytes) applied in order.
    public init(base: [UInt8], patches: [(byteOffset: Int, bytes: [UInt8])] = []) {
        self.base = base
        for patch in patches { store(patch.bytes[...], at: patch.byteOffset) }
    }

    /// A device reading the same bytes, whose writes do not affect this one.
    public func fork() -> OverlayDevice {
        let copy = OverlayDevice(base: base)
        copy.sectors = sectors
        copy.unreadableSectors = unreadableSectors
        return copy
    }

    /// Every byte, materialized (for replay output and debugging).
    public var image: [UInt8] {
        var bytes = base
        for (sector, content) in sectors {
            let lower = sector * Self.sectorByteCount, upper = min(bytes.count, lower + Self.sectorByteCount)
            bytes.replaceSubrange(lower..<upper, with: content[0..<(upper - lower)])
        }
        return bytes
    }

    public func byteCount() throws -> UInt64 { UInt64(base.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws {
        guard byteOffset <= UInt64(base.count), buffer.count <= base.count - Int(byteOffset) else {
            throw PoolError.io(errno: 34, operation: "read past the end of an overlay device", byteOffset: byteOffset)
        }
        let start = Int(byteOffset)
        if !unreadableSectors.isEmpty, buffer.count > 0,
           let bad = unreadableSectors.first(where: { $0 >= start / Self.sectorByteCount && $0 <= (start + buffer.count - 1) / Self.sectorByteCount }) {
            throw PoolError.io(errno: 5, operation: "read of an unreadable sector (simulated media error)", byteOffset: UInt64(bad * Self.sectorByteCount))
        }
        var done = 0
        while done < buffer.count {
            let position = start + done
            let sector = position / Self.sectorByteCount
            let inSector = position % Self.sectorByteCount
            let take = min(Self.sectorByteCount - inSector, buffer.count - done)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + take])
            if let content = sectors[sector] {
                content.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inSector..<inSector + take])) }
            } else {
                // Runs of untouched sectors come from the base in one copy.
                var end = position + take
                while end < start + buffer.count, sectors[end / Self.sectorByteCount] == nil {
                    end = min(start + buffer.count, (end / Self.sectorByteCount + 1) * Self.sectorByteCount)
                }
                let run = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(end - start)])
                base.withUnsafeBytes { run.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position..<end])) }
                done = end - start
                continue
            }
            done += take
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        guard byteOffset <= UInt64(base.count), bytes.count <= base.count - Int(byteOffset) else {
            throw PoolError.io(errno: 28, operation: "write past the end of an overlay device", byteOffset: byteOffset)
        }
        writeCount += 1
        if !unreadableSectors.isEmpty, bytes.count > 0 {
            // A rewritten sector is remapped by the drive and reads again.
            let first = Int(byteOffset) / Self.sectorByteCount, last = (Int(byteOffset) + bytes.count - 1) / Self.sectorByteCount
            unreadableSectors = unreadableSectors.filter { $0 < first || $0 > last }
        }
        store(Array(bytes)[...], at: Int(byteOffset))
    }

    public func sync() throws { syncCount += 1 }

    private func baseSector(_ sector: Int) -> [UInt8] {
        let lower = min(base.count, sector * Self.sectorByteCount)
        let upper = min(base.count, lower + Self.sectorByteCount)
        return Array(base[lower..<upper]) + [UInt8](repeating: 0, count: Self.sectorByteCount - (upper - lower))
    }

    private func store(_ bytes: ArraySlice<UInt8>, at byteOffset: Int) {
        var done = 0
        while done < bytes.count {
            let position = byteOffset + done
            let sector = position / Self.sectorByteCount
            let inSector = position % Self.sectorByteCount
            let take = min(Self.sectorByteCount - inSector, bytes.count - done)
            var content = sectors[sector] ?? baseSector(sector)
            let from = bytes.startIndex + done
            content.replaceSubrange(inSector..<inSector + take, with: bytes[from..<from + take])
            sectors[sector] = content
            done += take
        }
    }
}
