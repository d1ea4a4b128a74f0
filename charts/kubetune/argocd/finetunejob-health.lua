-- Argo CD health check for kubetune.io/FineTuneJob.
-- Install it as resource.customizations.health.kubetune.io_FineTuneJob in argocd-cm
-- (docs/install.md#argo-cd). It reads what the kubetune operator writes: status.stage, the
-- Succeeded condition and status.progress.
--   Succeeded             -> Healthy
--   Failed                -> Degraded (the reason and the operator's advice)
--   Suspended             -> Suspended (spec.suspend)
--   anything else         -> Progressing (Pending, Queued, waiting for a Secret, Preparing,
--                            Training, Evaluating, Exporting, Publishing; an older generation)
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function progress_text(progress)
  if progress == nil then
    return ""
  end
  local parts = {}
  if progress.percent ~= nil then
    table.insert(parts, progress.percent)
  end
  if progress.step ~= nil and progress.totalSteps ~= nil then
    table.insert(parts, "step " .. progress.step .. "/" .. progress.totalSteps)
  end
  if progress.loss ~= nil then
    table.insert(parts, "loss " .. progress.loss)
  end
  if progress.eta ~= nil then
    table.insert(parts, "ETA " .. progress.eta)
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

local status = obj.status
if status == nil or status.stage == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to report a status"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. generation
  return hs
end

local succeeded = condition(status, "Succeeded")
local reason = ""
local message = ""
if succeeded ~= nil then
  reason = succeeded.reason or ""
  message = succeeded.message or ""
end

local stage = status.stage
if stage == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
elseif stage == "Failed" then
  hs.status = "Degraded"
  if reason ~= "" then
    hs.message = reason .. ": " .. message
  else
    hs.message = message
  end
elseif stage == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
else
  hs.status = "Progressing"
  local text = stage .. progress_text(status.progress)
  if reason ~= "" and reason ~= "Running" and reason ~= "Pending" then
    text = text .. ": " .. reason
  end
  if message ~= "" then
    text = text .. ": " .. message
  end
  hs.message = text
end
return hs
